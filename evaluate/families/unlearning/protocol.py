"""Unlearning family: choose the clamp (tau, n, c) on a selection split, report U and U_CE on a disjoint test
split, against a random control matched on forget firing rate. Formulas in docs/metrics.md.

    forget / retain documents (held-out split) -- alternate --> selection half | test half
    selection half: firing rates (select_tokens tokens) -> features; sweep (sweep_predictions predictions,
                    top-1 accuracy by the exact shortcut) -> the chosen setting
    test half:      documents until unlearn_known known tokens per side -> U, U_CE, A_retain, control

Figures are sums per test document, forget documents then retain documents (two strata of the bootstrap).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csae.evaluate.families.unlearning.intervention import (
    EvalText,
    Score,
    matched_features,
    selection_stats,
    zero_intervention,
)
from csae.evaluate.families.unlearning.sweep import choose, clamp_of, sweep_layer
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.lm.clock import Clock
from csae.evaluate.lm.passes import Restart, clean_pass
from csae.evaluate.lm.text import (
    Piece,
    TextBatch,
    TextSource,
    alternate,
    batches,
    build_sequences,
    round_robin,
    text_batches,
)
from csae.evaluate.stats import FamilyResult, Figure, Units, additive, seed_of
from csae.shared.config.evaluate import EvalConfig
from csae.shared.lm.corpora import Document
from csae.shared.lm.models import LoadedModel

log = logging.getLogger(__name__)


def unlearning(lm: LoadedModel, ckpts: list[LayerCheckpoint], src: TextSource, cfg: EvalConfig,
               progress: bool,
               timings: dict[str, float] | None = None) -> tuple[FamilyResult, dict[str, Any]] | None:
    """(figures per checkpoint, sweep points per checkpoint), or None when the corpus lacks the topics."""
    clock = Clock("unlearning", timings)
    found = _topic_docs(src, cfg)
    if found is None:
        return None
    (forget_sel, forget_test), (retain_sel, retain_test) = found
    layers = sorted({c.layer for c in ckpts})
    tok = lm.tokenizer

    def select(docs: list[Document]) -> dict[int, torch.Tensor]:
        text = text_batches(tok, docs, src.context, cfg.select_tokens, cfg.lm_batch_size, unit="tokens")
        return _residuals(lm, text, layers)

    def sweep_text(docs: list[Document]) -> EvalText:
        text = EvalText(lm.model, layers, cfg.logit_chunk)
        for batch in text_batches(tok, docs, src.context, cfg.sweep_predictions, cfg.lm_batch_size):
            text.add(batch)
        return text

    with clock("text"):
        sel_f, sel_r = select(forget_sel), select(retain_sel)
        sweep_f, sweep_r = sweep_text(forget_sel), sweep_text(retain_sel)
        test_f = _known_text(lm, forget_test, src, cfg, layers)
        test_r = _known_text(lm, retain_test, src, cfg, layers)
    if min(test_f.n_known, test_r.n_known, sweep_f.n_known, sweep_r.n_known) == 0:
        log.warning("unlearning skipped: too little forget or retain text with known tokens")
        return None
    for text, name in ((test_f, "forget"), (test_r, "retain")):
        if text.n_known < cfg.unlearn_known:
            log.warning("the held-out %s text has only %d known tokens (unlearn_known = %d)", name, text.n_known,
                        cfg.unlearn_known)
    with clock("text"):
        restart = _verified_restart(lm, test_f.items[0].batch, layers)
        clean_f, clean_r = test_f.clean(), test_r.clean()
        zero_f = {layer: test_f.score(restart, layer, zero_intervention, ce=True) for layer in layers}

    n_points = len(cfg.retain_thresholds) * len(cfg.ns) * len(cfg.cs) * len(ckpts)
    bar = tqdm(total=n_points, desc="unlearning sweep", unit="pt", disable=not progress)
    texts = _Texts(sel_f, sel_r, sweep_f, sweep_r, test_f, test_r, clean_f, clean_r, restart)
    found_by_key: dict[str, tuple[dict[str, Figure], dict[str, float], dict[str, Any]]] = {}
    for layer in layers:
        group = [c for c in ckpts if c.layer == layer]
        found_by_key.update(_layer(group, texts, zero_f[layer], cfg, clock, bar))
    bar.close()
    figures = {c.key: found_by_key[c.key][0] for c in ckpts}
    extras = {c.key: found_by_key[c.key][1] for c in ckpts}
    points = {c.key: found_by_key[c.key][2] for c in ckpts}
    return FamilyResult(Units((test_f.n_docs, test_r.n_docs)), figures, extras), points


@dataclass(frozen=True)
class _Texts:
    """Everything the SAEs of every layer share: selection residuals, the sweep and test texts with their clean
    passes, the clean scores and the verified restart."""

    sel_f: dict[int, torch.Tensor]
    sel_r: dict[int, torch.Tensor]
    sweep_f: EvalText
    sweep_r: EvalText
    test_f: EvalText
    test_r: EvalText
    clean_f: Score
    clean_r: Score
    restart: Restart


def _layer(group: list[LayerCheckpoint], t: _Texts, zero_f: Score, cfg: EvalConfig, clock: Clock,
           bar: Any) -> dict[str, tuple[dict[str, Figure], dict[str, float], dict[str, Any]]]:
    """Figures, extras and points of every SAE of one layer: their sweeps, tests and controls each share the
    restarted forwards (`EvalText.score_many`)."""
    layer = group[0].layer
    with clock("selection"):
        sels = [selection_stats(c.sae, t.sel_f[layer], t.sel_r[layer], cfg.sae_batch_size) for c in group]
    with clock("sweep"):
        swept = sweep_layer(group, sels, t.sweep_f, t.sweep_r, t.restart, cfg, bar)
    chosen = [choose(pts, cfg.retain_accuracy) for pts in swept]
    clamps = [None if ch is None else clamp_of(c, s, torch.tensor(ch["features"]), ch["c"])
              for c, s, ch in zip(group, sels, chosen, strict=True)]
    with clock("test"):
        test_f = t.test_f.score_many(t.restart, layer, clamps, ce=True)
        test_r = t.test_r.score_many(t.restart, layer, clamps, ce=True)
    drawn: list[list[torch.Tensor]] = [[] for _ in group]
    for i, (c, s, ch) in enumerate(zip(group, sels, chosen, strict=True)):
        for k in range(cfg.random_draws if ch is not None else 0):  # nothing chosen: no intervention, U = 0
            rng = np.random.default_rng(seed_of(cfg.seed, 3, layer, c.seed, k))
            drawn[i].append(matched_features(s.nu_forget_F, torch.tensor(ch["features"]), rng))  # type: ignore
    with clock("control"):
        flat = t.test_f.score_many(t.restart, layer, [clamp_of(c, s, f, ch["c"])  # type: ignore[index]
                                                      for c, s, ch, fs in zip(group, sels, chosen, drawn, strict=True)
                                                      for f in fs], ce=False)
    out = {}
    for i, (c, ch) in enumerate(zip(group, chosen, strict=True)):
        sel_f, sel_r = (test_f[i], test_r[i]) if ch is not None else (t.clean_f, t.clean_r)
        draws, flat = flat[:len(drawn[i])], flat[len(drawn[i]):]
        figs = _figures(t.clean_f, t.clean_r, zero_f, sel_f, sel_r, draws, control=cfg.random_draws > 0)
        extra = _extras(t.test_f, t.test_r, ch, [sel_f, sel_r, *draws])
        points = {"sweep": swept[i], "chosen": ch, "test": {
            "A_forget": sel_f.accuracy, "A_retain": sel_r.accuracy, "random_A_forget": [d.accuracy for d in draws],
            "random_features": [f.tolist() for f in drawn[i]]}}
        out[c.key] = (figs, extra, points)
    return out


def _figures(clean_f: Score, clean_r: Score, zero_f: Score, sel_f: Score, sel_r: Score, draws: list[Score], *,
             control: bool) -> dict[str, Figure]:
    d_f, d_r = len(clean_f.n_D), len(clean_r.n_D)

    def forget(*cols: np.ndarray) -> np.ndarray:
        return np.concatenate([np.stack(cols, axis=1), np.zeros((d_r, len(cols)))])

    def retain(*cols: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros((d_f, len(cols))), np.stack(cols, axis=1)])

    known = clean_f.known_D
    kept_random = [d.kept_D for d in draws]
    figs = {
        "unlearn_U": additive(forget(sel_f.kept_D, known), lambda t: 1 - t[:, 0] / t[:, 1]),
        "unlearn_U_CE": additive(forget(sel_f.nll_D - clean_f.nll_D, zero_f.nll_D - clean_f.nll_D),  # type: ignore
                                 lambda t: t[:, 0] / t[:, 1]),
        "unlearn_A_retain": additive(retain(sel_r.kept_D, clean_r.known_D), lambda t: t[:, 0] / t[:, 1]),
        "unlearn_dCE_retain": additive(retain(sel_r.nll_D - clean_r.nll_D, clean_r.n_D),  # type: ignore[operator]
                                       lambda t: t[:, 0] / t[:, 1]),
    }
    if kept_random:
        def u_random(t: np.ndarray) -> np.ndarray:
            return 1 - (t[:, 2:] / t[:, :1]).mean(axis=1)

        sums = forget(known, sel_f.kept_D, *kept_random)
        figs["unlearn_U_random"] = additive(sums, u_random)
        figs["unlearn_U_minus_random"] = additive(sums, lambda t: (1 - t[:, 1] / t[:, 0]) - u_random(t))
        spread = np.std([1 - k.sum() / known.sum() for k in kept_random], ddof=1) if len(draws) > 1 else np.nan
        figs["unlearn_U_random_sd"] = Figure(float(spread), interval=False)
    elif control:  # nothing was chosen: no intervention, so none for the control either
        figs["unlearn_U_random"] = Figure(0.0)
        figs["unlearn_U_minus_random"] = Figure(0.0)
    return figs


def _extras(test_f: EvalText, test_r: EvalText, chosen: dict[str, Any] | None,
            scores: list[Score]) -> dict[str, float]:
    out = {"unlearn_forget_known": test_f.n_known, "unlearn_retain_known": test_r.n_known,
           "unlearn_forget_predictions": test_f.n_predictions, "unlearn_retain_predictions": test_r.n_predictions,
           "unlearn_forget_docs": test_f.n_docs, "unlearn_retain_docs": test_r.n_docs,
           "unlearn_head_predictions": sum(s.head_predictions for s in scores)}
    if chosen is not None:
        out.update({"unlearn_tau": chosen["retain_threshold"], "unlearn_n": len(chosen["features"]),
                    "unlearn_c": chosen["c"], "unlearn_sweep_A_forget": chosen["A_forget"],
                    "unlearn_sweep_A_retain": chosen["A_retain"]})
    return out


def _topic_docs(src: TextSource, cfg: EvalConfig) -> tuple[tuple[list[Document], list[Document]],
                                                           tuple[list[Document], list[Document]]] | None:
    """((forget selection, forget test), (retain selection, retain test)) documents of the held-out split."""
    by_topic: dict[str, list[Document]] = defaultdict(list)
    for doc in src.documents():
        by_topic[doc.topic].append(doc)
    retain = [by_topic[t] for t in cfg.retain_topics if by_topic.get(t)]
    if not by_topic.get(cfg.forget_topic) or not retain:
        log.warning(f"unlearning skipped: the held-out split of {src.dataset!r} has no documents of the forget "
                    f"topic {cfg.forget_topic!r} or of the retain topics {list(cfg.retain_topics)} (its topics: "
                    f"{sorted(t for t in by_topic if t)}); set --forget-topic/--retain-topics")
        return None
    halves = [alternate(g) for g in retain]
    retain_sel, retain_test = list(round_robin([h[0] for h in halves])), list(round_robin([h[1] for h in halves]))
    return alternate(by_topic[cfg.forget_topic]), (retain_sel, retain_test)


def _known_text(lm: LoadedModel, docs: Iterable[Document], src: TextSource, cfg: EvalConfig,
                layers: list[int]) -> EvalText:
    """Test text: whole documents in order until `unlearn_known` known tokens, a window of sequences at a time
    (sorted by length within the window, so padding stays small). The window that crosses `unlearn_known`
    keeps only the documents up to the one that reaches it (`EvalText.up_to_doc`): the test's restarts and CE
    cost in proportion to its predictions."""
    tok = lm.tokenizer
    pieces = build_sequences(docs, tok, src.context, 2**62)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def clean(part: list[Piece]) -> EvalText:
        text = EvalText(lm.model, layers, cfg.logit_chunk)
        for batch in batches(part, cfg.lm_batch_size, pad, tok.bos_token_id is not None):
            text.add(batch)
        return text

    text = EvalText(lm.model, layers, cfg.logit_chunk)
    window = 2 * cfg.lm_batch_size
    for start in range(0, len(pieces), window):
        part = pieces[start:start + window]
        cleaned = clean(part)
        missing = cfg.unlearn_known - text.n_known
        if cleaned.n_known >= missing:
            known_D = cleaned.clean().known_D  # known tokens per document (index: document number)
            reached = int(np.searchsorted(np.cumsum(known_D), missing))  # the first document that reaches it
            text.extend(cleaned.up_to_doc(reached))
            break
        text.extend(cleaned)
    return text


def _residuals(lm: LoadedModel, text: list[TextBatch], layers: list[int]) -> dict[int, torch.Tensor]:
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in text:
        clean = clean_pass(lm.model, batch, layers, final=False)
        for layer in layers:
            out[layer].append(clean.resid[layer][batch.text_BT])
    return {layer: torch.cat(v) if v else torch.empty(0, lm.d_model) for layer, v in out.items()}


def _verified_restart(lm: LoadedModel, batch: TextBatch, layers: list[int]) -> Restart:
    clean = clean_pass(lm.model, batch, layers)
    restart = Restart(lm.model, clean.tuple_out)
    for layer in layers:
        restart.verify(batch, clean, layer)
    return restart
