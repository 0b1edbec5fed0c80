"""TPP (targeted probe perturbation, SAEBench's scr_and_tpp eval with perform_scr off) on the sparse-probing
family's documents and sets (probing.py).

For each topic t: its full-width residual probe w_t (trained on the training side), each latent's effect on
it e_f = max(0, mean code over t's positives - over its negatives) * (w_t . W_dec[f]) on the training side,
and the N latents with the largest non-zero effect zero-ablated. Ablation keeps the SAE's error, so a
document's probed mean residual becomes x_mean - sum_{f in S} code_mean_f W_dec[f] (exact: the decoder is
linear and the mean is over the same positions). Then every topic j's probe is tested on its own test set:

    tpp_n<N> = mean over t of [ (A_t - A_t|t) - mean over j != t of (A_j - A_j|t) ]

A_j the clean accuracy of probe j, A_j|t with topic t's N latents ablated: a large drop where the ablated
latents belong, none elsewhere. tpp_intended_n<N> and tpp_unintended_n<N> are the two means on their own.
Accuracies are ratios of sums over test documents, so a replicate reweights the documents. Read
docs/metrics.md for what TPP does not show (Chanin 2026).
Shape suffixes: D documents, F features, M model width, T topics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from csae.evaluate.stats import Figure, additive

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

    from csae.evaluate.families.probing import ProbeSets


def effects(codes_DF: np.ndarray, w_dec_FM: np.ndarray, w_M: np.ndarray, pos: np.ndarray,
            neg: np.ndarray) -> np.ndarray:
    """Each latent's effect on a probe with weights w_M (training documents pos / neg)."""
    diff = codes_DF[pos].mean(axis=0, dtype=np.float64) - codes_DF[neg].mean(axis=0, dtype=np.float64)
    return np.clip(diff, 0, None) * (w_dec_FM.astype(np.float64) @ w_M.astype(np.float64))


def ablated_latents(effect_F: np.ndarray, n: int) -> np.ndarray:
    """The n latents with the largest non-zero effect (fewer when fewer are non-zero)."""
    order = np.argsort(-effect_F, kind="stable")
    return order[effect_F[order] != 0][:n]


def tpp_figures(codes_DF: np.ndarray, w_dec_FM: np.ndarray, resid_DM: np.ndarray, sets: ProbeSets,
                probes: list[LogisticRegression], ns: tuple[int, ...]) -> dict[str, Figure]:
    """{f"tpp_n{N}": Figure}; empty with fewer than two usable topics. probes: one per usable topic."""
    from csae.evaluate.families.probing import membership

    topics = np.flatnonzero(sets.usable)
    u = len(topics)
    if u < 2 or not ns:
        return {}
    member, label = membership(sets, topics)
    x_test, a_test = resid_DM[sets.test_docs], codes_DF[sets.test_docs]

    def correct(x_DM: np.ndarray) -> np.ndarray:
        return np.stack([(p.predict(x_DM.astype(np.float32)) == label[:, j]) * member[:, j]
                         for j, p in enumerate(probes)], axis=1)

    clean = correct(x_test)
    effect = [effects(codes_DF, w_dec_FM, p.coef_[0], *sets.train[t]) for p, t in zip(probes, topics, strict=True)]

    def parts(tot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(intended drop, mean unintended drop) per replicate and ablated topic."""
        with np.errstate(invalid="ignore", divide="ignore"):
            n_BJ = tot[:, :u]
            drop_BTJ = (tot[:, u:2 * u] / n_BJ)[:, None, :] - tot[:, 2 * u:].reshape(-1, u, u) / n_BJ[:, None, :]
        intended = np.einsum("btt->bt", drop_BTJ)
        return intended, (drop_BTJ.sum(axis=2) - intended) / (u - 1)

    figs = {}
    for n in ns:
        ablated = []
        for i in range(u):
            s = ablated_latents(effect[i], n)
            ablated.append(correct(x_test - a_test[:, s] @ w_dec_FM[s]))
        abl_DTJ = np.stack(ablated, axis=1)
        sums = np.concatenate([member, clean, abl_DTJ.reshape(len(member), -1)], axis=1)
        figs[f"tpp_n{n}"] = additive(sums, lambda t: np.subtract(*parts(t)).mean(axis=1))
        figs[f"tpp_intended_n{n}"] = additive(sums, lambda t: parts(t)[0].mean(axis=1))
        figs[f"tpp_unintended_n{n}"] = additive(sums, lambda t: parts(t)[1].mean(axis=1))
    return figs
