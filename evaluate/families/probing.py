"""Sparse probing family (SAEBench's k-sparse probing, on the corpus's topics): can k features, chosen by
the data, tell a topic's documents from others as well as the residual stream does? Documents are the unit.

Protocol (SAEBench evals/sparse_probing, with the store's documents and their topics for its data sets):
- documents: `probe_docs` of the store's documents with a topic (all when there are fewer, else drawn as evenly
  over topics as they allow: `balanced_sample`; no
  language-model pass: the codes come from the stored rows, training and held-out rows alike, as SAEBench
  does not hold the SAE's training text out either); a split stratified by topic, `probe_test_fraction` of
  each topic's documents on the test side, fixed by evaluate's seed;
- per document the mean over its positions of the SAE codes (each token encoded, then averaged), and the
  same mean of the raw residual for the references;
- one-vs-rest per topic, on each side: positives the topic's documents, as many negatives drawn evenly
  from the other topics (ceil(n / (T - 1)) from each, then n of those at random);
- features ranked by |mean over positives - mean over negatives| on the training documents only, the top k
  kept; sklearn LogisticRegression (L2, C = 1) on those k columns; test accuracy, averaged over topics.
  References: the same top-k procedure on the residual's channels, and a full-width probe on the residual.
A topic with fewer than `probe_min_test_docs` positive test documents is left out of the averages and
counted in `probe_thin_topics` (its counts are still reported).

Figures (interval: test documents resampled, and training seeds): probe_acc_k<k>, probe_resid_acc_k<k>,
probe_resid_acc_full; TPP (tpp.py) on the same sets and full-width probes. Each accuracy is a ratio of sums
over test documents (correct / members of a topic's test set), so a replicate reweights the documents.

Shape suffixes: D documents, F features, M model width, T topics, N rows.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from csae.evaluate.families.tpp import tpp_figures
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.stats import FamilyResult, Figure, Units, additive, seed_of
from csae.shared.config.evaluate import EvalConfig
from csae.shared.store.schema import ActivationStore

log = logging.getLogger(__name__)

#: seed_of purpose ids of this family (store families use 4-8).
_PURPOSE_DOCS, _PURPOSE_SETS = 9, 10


@dataclass(frozen=True)
class ProbeSets:
    """Each topic's one-vs-rest sets on each side, as indices into the probed documents."""

    train: list[tuple[np.ndarray, np.ndarray]]
    """Per topic (positive documents, negative documents) of the training side."""
    test: list[tuple[np.ndarray, np.ndarray]]
    test_docs: np.ndarray
    """The test documents (sorted): the resampling units, in this order."""
    usable: np.ndarray
    """Per topic: enters the averages (enough test positives and negatives, training documents of both kinds)."""


def split_documents(topic_D: np.ndarray, n_topics: int, test_fraction: float, seed: int) -> np.ndarray:
    """Test side of a split stratified by topic: round(test_fraction * n_t) of each topic's documents."""
    rng = np.random.default_rng(seed)
    test_D = np.zeros(len(topic_D), dtype=bool)
    for t in range(n_topics):
        docs = np.flatnonzero(topic_D == t)
        test_D[rng.permutation(docs)[:round(test_fraction * len(docs))]] = True
    return test_D


def one_vs_rest(topic_D: np.ndarray, docs: np.ndarray, t: int, n_topics: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) among `docs`: topic t's, and as many drawn evenly from the other topics."""
    pos = docs[topic_D[docs] == t]
    per = math.ceil(len(pos) / max(n_topics - 1, 1))
    drawn = [rng.permutation(docs[topic_D[docs] == u])[:per] for u in range(n_topics) if u != t]
    neg = rng.permutation(np.concatenate(drawn or [np.zeros(0, np.int64)]))[:len(pos)]
    return pos, np.sort(neg)


def probe_sets(topic_D: np.ndarray, test_D: np.ndarray, n_topics: int, min_test: int, seed: int) -> ProbeSets:
    rng = np.random.default_rng(seed)
    train_docs, test_docs = np.flatnonzero(~test_D), np.flatnonzero(test_D)
    train = [one_vs_rest(topic_D, train_docs, t, n_topics, rng) for t in range(n_topics)]
    test = [one_vs_rest(topic_D, test_docs, t, n_topics, rng) for t in range(n_topics)]
    usable = np.array([min(len(te[0]), len(te[1])) >= max(min_test, 1) and min(len(tr[0]), len(tr[1])) >= 1
                       for tr, te in zip(train, test, strict=True)], dtype=bool)
    return ProbeSets(train, test, test_docs, usable)


def _fit(x_DK: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> LogisticRegression:
    """sklearn's L2 logistic regression, C = 1 (SAEBench's sparse probe), on float32 inputs."""
    x = np.concatenate([x_DK[pos], x_DK[neg]]).astype(np.float32)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=1.0, max_iter=1000).fit(x, y)


def top_k(x_DF: np.ndarray, pos: np.ndarray, neg: np.ndarray, k: int) -> np.ndarray:
    """The k columns with the largest |mean over pos - mean over neg| (ties: the lower index)."""
    diff = np.abs(x_DF[pos].mean(axis=0, dtype=np.float64) - x_DF[neg].mean(axis=0, dtype=np.float64))
    return np.argsort(-diff, kind="stable")[:k]


def accuracy_figure(correct_DT: np.ndarray, member_DT: np.ndarray) -> Figure:
    """Mean over topics of (correct / members of the topic's test set), each a ratio of sums over documents."""
    t = correct_DT.shape[1]

    def mean_accuracy(tot: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.mean(tot[:, :t] / tot[:, t:], axis=1)

    return additive(np.concatenate([correct_DT, member_DT], axis=1), mean_accuracy)


def membership(sets: ProbeSets, topics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member (test docs, topics) 0/1, label: 1 on positives) of the given topics' test sets."""
    member = np.zeros((len(sets.test_docs), len(topics)))
    label = np.zeros_like(member)
    for j, t in enumerate(topics):
        pos, neg = sets.test[t]
        member[np.searchsorted(sets.test_docs, pos), j] = 1
        member[np.searchsorted(sets.test_docs, neg), j] = 1
        label[np.searchsorted(sets.test_docs, pos), j] = 1
    return member, label


def predictions(probe: LogisticRegression, x_DK: np.ndarray) -> np.ndarray:
    return probe.predict(x_DK.astype(np.float32))


def sparse_probing(x_DF: np.ndarray, sets: ProbeSets, ks: tuple[int, ...],
                   prefix: str) -> tuple[dict[str, Figure], dict[int, list[np.ndarray]]]:
    """({f"{prefix}{k}": accuracy figure}, {k: the chosen columns per usable topic})."""
    topics = np.flatnonzero(sets.usable)
    member, label = membership(sets, topics)
    x_test = x_DF[sets.test_docs]
    figs, chosen = {}, {}
    for k in ks:
        correct = np.zeros_like(member)
        chosen[k] = []
        for j, t in enumerate(topics):
            pos, neg = sets.train[t]
            cols = top_k(x_DF, pos, neg, k)
            chosen[k].append(cols)
            probe = _fit(x_DF[:, cols], pos, neg)
            correct[:, j] = (predictions(probe, x_test[:, cols]) == label[:, j]) * member[:, j]
        figs[f"{prefix}{k}"] = accuracy_figure(correct, member)
    return figs, chosen


def block_probing(x_DF: np.ndarray, block: np.ndarray | None, sets: ProbeSets,
                  ks: tuple[int, ...]) -> dict[str, Figure]:
    """`probe_block_acc_k<k>`: the same sparse probing with only the block's features to choose from (T-SAE's
    high-level block, or the features matched to it on firing rate); {} without a block."""
    if block is None:
        return {}
    return sparse_probing(x_DF[:, block], sets, ks, "probe_block_acc_k")[0]


def full_probes(resid_DM: np.ndarray, sets: ProbeSets) -> tuple[list[LogisticRegression], Figure]:
    """The full-width residual probe of each usable topic (the ceiling; TPP's probes) and its accuracy."""
    topics = np.flatnonzero(sets.usable)
    member, label = membership(sets, topics)
    probes = [_fit(resid_DM, *sets.train[t]) for t in topics]
    correct = np.stack([(predictions(p, resid_DM[sets.test_docs]) == label[:, j]) * member[:, j]
                        for j, p in enumerate(probes)], axis=1) if len(topics) else member
    return probes, accuracy_figure(correct, member)


def probe_sae(codes_DF: np.ndarray, w_dec_FM: np.ndarray, resid_DM: np.ndarray, sets: ProbeSets,
              probes: list[LogisticRegression], block: np.ndarray | None, ks: tuple[int, ...],
              tpp_ns: tuple[int, ...]) -> tuple[dict[str, Figure], dict[str, Figure], dict[int, list[np.ndarray]]]:
    """One SAE's sparse probing and TPP figures, its block probing figures and the columns its probes chose."""
    figs, picked = sparse_probing(codes_DF, sets, ks, "probe_acc_k")
    figs.update(tpp_figures(codes_DF, w_dec_FM, resid_DM, sets, probes, tpp_ns))
    return figs, block_probing(codes_DF, block, sets, ks), picked


@dataclass
class LayerMeans:
    """Per probed document: its rows, the mean residual and each SAE's mean codes (by checkpoint key)."""

    n_D: np.ndarray
    resid_DM: np.ndarray
    codes: dict[str, np.ndarray]


@torch.inference_mode()
def doc_means(store: ActivationStore, layer: int, local_N: np.ndarray, n_docs: int, group: list[LayerCheckpoint],
              batch: int, bar: tqdm) -> LayerMeans:
    """One pass over the store's rows: per probed document (local_N: its index, -1 for other rows) the mean
    residual and each SAE's mean codes. Rows are read in whole chunks, encoded by every SAE of the layer."""
    sums = torch.zeros(n_docs, store.d_model, dtype=torch.float64)
    codes = {c.key: torch.zeros(n_docs, c.sae.d_sae, dtype=torch.float32) for c in group}
    step = max(store.chunk_rows, batch // store.chunk_rows * store.chunk_rows)
    for start in range(0, store.n_rows, step):
        stop = min(store.n_rows, start + step)
        keep = np.flatnonzero(local_N[start:stop] >= 0)
        if len(keep):
            x = store.read(layer, start, stop).float()[torch.from_numpy(keep)]
            doc = torch.from_numpy(local_N[start:stop][keep])
            sums.index_add_(0, doc, x.double())
            for c in group:
                for s in range(0, len(x), batch):
                    codes[c.key].index_add_(0, doc[s:s + batch], c.sae.encode(x[s:s + batch]).float())
        bar.update(stop - start)
    n_D = np.bincount(local_N[local_N >= 0], minlength=n_docs).astype(np.float64)
    div = torch.from_numpy(np.maximum(n_D, 1))[:, None]
    return LayerMeans(n_D, (sums / div).float().numpy(),
                      {k: (v / div.float()).numpy() for k, v in codes.items()})


def topic_quotas(sizes_T: np.ndarray, n: int) -> np.ndarray:
    """How many documents of each topic a sample of n takes, as evenly as the topics allow: all of a topic's
    when it has fewer than the level L, else L (the largest L whose total fits), the rest one more each from
    the largest topics that still have some."""
    take = np.zeros_like(sizes_T)
    left, order = n, np.argsort(sizes_T, kind="stable")
    for i, t in enumerate(order):  # smallest first: each takes its fair share of what is left, or all it has
        take[t] = min(sizes_T[t], left // (len(order) - i))
        left -= take[t]
    for t in order[::-1]:  # the remainder of the division, one each, largest topics first
        if left and take[t] < sizes_T[t]:
            take[t] += 1
            left -= 1
    return take


def balanced_sample(topic_P: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n documents drawn per topic by `topic_quotas` (uniformly within a topic), sorted: a small
    topic keeps all its documents, so it keeps enough on the test side to be probed."""
    topics = np.unique(topic_P)
    quotas = topic_quotas(np.array([(topic_P == t).sum() for t in topics]), n)
    picked = [rng.choice(np.flatnonzero(topic_P == t), size=q, replace=False) for t, q in zip(topics, quotas,
                                                                                                strict=True)]
    return np.sort(np.concatenate(picked))


def chosen_documents(store: ActivationStore, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(store document of each probed document, local index of each store row: -1 when not probed)."""
    doc_N = store.tokens("doc").astype(np.int64)
    topic_all = store.docs("topic").astype(np.int64)
    present = np.unique(doc_N[doc_N >= 0])
    present = present[topic_all[present] >= 0]
    if len(present) > cfg.probe_docs:
        rng = np.random.default_rng(seed_of(cfg.seed, _PURPOSE_DOCS))
        present = np.sort(present[balanced_sample(topic_all[present], cfg.probe_docs, rng)])
    local = np.full(int(doc_N.max(initial=-1)) + 2, -1, dtype=np.int64)
    local[present] = np.arange(len(present))
    return present, local[doc_N]


def count_extras(topics: list[str], topic_D: np.ndarray, test_D: np.ndarray, sets: ProbeSets) -> dict[str, float]:
    out: dict[str, float] = {"probe_train_docs": int((~test_D).sum()), "probe_test_docs": int(test_D.sum()),
                             "probe_topics": int(sets.usable.sum()), "probe_thin_topics": int((~sets.usable).sum())}
    for t, name in enumerate(topics):
        out[f"probe_train_docs/{name}"] = int(((topic_D == t) & ~test_D).sum())
        out[f"probe_test_docs/{name}"] = int(((topic_D == t) & test_D).sum())
    return out


@dataclass(frozen=True)
class ProbeTask:
    """The probed documents (the same for every layer and SAE) and their sets."""

    docs: np.ndarray
    """Store document of each probed document."""
    local_N: np.ndarray
    """Probed-document index of each store row (-1: not probed)."""
    topic_D: np.ndarray
    test_D: np.ndarray
    sets: ProbeSets


def probe_task(store: ActivationStore, cfg: EvalConfig) -> ProbeTask:
    docs, local_N = chosen_documents(store, cfg)
    topic_D = store.docs("topic").astype(np.int64)[docs]
    test_D = split_documents(topic_D, len(store.topics), cfg.probe_test_fraction, seed_of(cfg.seed, _PURPOSE_DOCS, 1))
    sets = probe_sets(topic_D, test_D, len(store.topics), cfg.probe_min_test_docs, seed_of(cfg.seed, _PURPOSE_SETS))
    return ProbeTask(docs, local_N, topic_D, test_D, sets)


def probing_family(store: ActivationStore, ckpts: list[LayerCheckpoint], cfg: EvalConfig, progress: bool,
                   blocks: dict[str, np.ndarray] | None = None
                   ) -> tuple[list[FamilyResult], dict[str, dict[str, list[int]]]]:
    """(one FamilyResult per layer, {checkpoint key: {topic: features chosen at the largest k}}); nothing when
    `probe_docs` is 0 or the store has no topics. blocks: {checkpoint key: the features of its high-level block
    (temporal.blocks_of)}, probed on their own too (`block_probing`)."""
    if not cfg.probe_docs or not store.topics or "docs/topic" not in store.group:
        return [], {}
    task, topics = probe_task(store, cfg), list(store.topics)
    sets = task.sets
    extras = count_extras(topics, task.topic_D, task.test_D, sets)
    thin = [topics[t] for t in np.flatnonzero(~sets.usable)]
    if thin:
        log.warning("sparse probing: topics with fewer than %d test documents (or none to train on) are left out "
                    "of the averages: %s", cfg.probe_min_test_docs, ", ".join(thin))
    by_layer: dict[int, list[LayerCheckpoint]] = defaultdict(list)
    for c in ckpts:
        by_layer[c.layer].append(c)
    usable = np.flatnonzero(sets.usable)
    results, chosen = [], {}
    bar = tqdm(total=store.n_rows * len(by_layer), unit="row", unit_scale=True, desc="sparse probing",
               disable=not progress)
    for layer, group in sorted(by_layer.items()):
        means = doc_means(store, layer, task.local_N, len(task.docs), group, cfg.sae_batch_size, bar)
        ref, _ = sparse_probing(means.resid_DM, sets, cfg.probe_ks, "probe_resid_acc_k")
        probes, ref["probe_resid_acc_full"] = full_probes(means.resid_DM, sets)
        # the SAEs' probes are thousands of small sklearn fits, bound by Python's interpreter rather than by
        # arithmetic: one worker process per thread torch was given fits them side by side (same results)
        workers = max(1, min(len(group), torch.get_num_threads()))
        done = Parallel(n_jobs=workers)(
            delayed(probe_sae)(means.codes[c.key], c.sae.W_dec.detach().float().numpy(), means.resid_DM, sets,
                               probes, (blocks or {}).get(c.key), cfg.probe_ks, cfg.tpp_ns) for c in group)
        figures = {}
        for c, (figs, block_figs, picked) in zip(group, done, strict=True):
            figures[c.key] = {**figs, **ref, **block_figs}
            chosen[c.key] = {topics[t]: picked[max(cfg.probe_ks)][j].tolist() for j, t in enumerate(usable)}
        results.append(FamilyResult(Units((len(sets.test_docs),)), figures, {c.key: extras for c in group}))
    bar.close()
    return results, chosen
