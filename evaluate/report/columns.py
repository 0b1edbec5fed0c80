"""Every reported figure's column title and format, and for the headline figures (metrics.json, the verdict
table) the direction of "better", declared once here."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from csae.shared.config.evaluate import EvalConfig


@dataclass(frozen=True)
class Column:
    name: str
    title: str
    fmt: str = "{:.3f}"
    higher_is_better: bool | None = None
    """None: not a headline figure (no verdict)."""


#: Headline figures, in report order (sparse probing and TPP at the default k and N; other values of probe_ks
#: and tpp_ns are in metrics_all.json). L0 counts as better when lower: at equal reconstruction a sparser code
#: is the goal, but read it together with explained variance (a trade-off, not a free win). The block figures
#: (T-SAE's high-level block, or features matched to it on firing rate: evaluate/families/temporal.py) exist only
#: when a run with a block is evaluated; smoothness counts as better when higher, T-SAE's stated aim for that
#: block (slowly varying, sequence-level features), not a quality of every feature.
HEADLINE = (
    Column("explained_variance", "expl. var", higher_is_better=True),
    Column("ce_score", "CE score", higher_is_better=True),
    Column("ce_score_saelens", "CE score (SAELens)", higher_is_better=True),
    Column("kl_score", "KL score", higher_is_better=True),
    Column("l0", "L0", "{:.1f}", higher_is_better=False),
    Column("dead_fraction", "dead", higher_is_better=False),
    Column("dec_mean_abs_cos", "dec mean|cos|", "{:.4f}", higher_is_better=False),
    Column("dec_max_cos", "dec max cos", higher_is_better=False),
    Column("heldout_infonce", "InfoNCE (fresh head)", higher_is_better=False),
    Column("topic_excess", "topic excess", "{:.4f}", higher_is_better=True),
    *(Column(f"probe_acc_k{k}", f"sparse probe acc k={k}", higher_is_better=True) for k in EvalConfig.probe_ks),
    *(Column(f"tpp_n{n}", f"TPP N={n}", "{:.4f}", higher_is_better=True) for n in EvalConfig.tpp_ns),
    *(Column(f"probe_block_acc_k{k}", f"block probe acc k={k}", higher_is_better=True) for k in EvalConfig.probe_ks),
    Column("smoothness_block", "smoothness (block)", higher_is_better=True),
    Column("unlearn_U", "U", higher_is_better=True),
    Column("unlearn_U_minus_random", "U - U_rand", higher_is_better=True),
    Column("unlearn_U_CE", "U_CE", higher_is_better=True),
)

#: Further columns of report.md (every figure is in metrics_all.json).
SECONDARY = (
    Column("fvu", "FVU"), Column("cosine", "cos"), Column("relative_bias", "rel. bias"), Column("l2_ratio", "l2 ratio"),
    Column("kl_score_saelens", "KL score (SAELens)"), Column("ce_loss_increase", "dCE (nats)"),
    Column("dense_fraction_0.01", "dense>1%"), Column("heldout_trained_infonce", "InfoNCE (trained head)"),
    Column("heldout_sim_gap", "sim gap (fresh)"), Column("coactivation_mean_abs_corr", "coact |corr|"),
    Column("topic_significant_fraction", "topic-significant"), Column("topic_entropy_ratio", "topic H ratio"),
    Column("smoothness_all", "smoothness (all features)"),
    *(Column(f"probe_resid_acc_k{k}", f"residual top-{k} probe acc") for k in EvalConfig.probe_ks),
    Column("probe_resid_acc_full", "residual full probe acc"),
    Column("unlearn_A_retain", "A_retain"), Column("unlearn_U_random", "U_rand"),
    Column("unlearn_U_random_sd", "U_rand sd"), Column("unlearn_dCE_retain", "dCE retain"),
)

DIRECTION = {c.name: c.higher_is_better for c in HEADLINE}

class Ranges(Mapping[str, tuple[float, float]]):
    """Figure name -> its range: the names listed, and every name that starts with one of the prefixes (figures
    named per setting, e.g. probe_acc_k<k>)."""

    def __init__(self, exact: dict[str, tuple[float, float]], prefixes: dict[str, tuple[float, float]]) -> None:
        self.exact, self.prefixes = exact, prefixes

    def __getitem__(self, name: str) -> tuple[float, float]:
        if name in self.exact:
            return self.exact[name]
        for prefix, bounds in self.prefixes.items():
            if name.startswith(prefix):
                return bounds
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.exact)

    def __len__(self) -> int:
        return len(self.exact)


#: Figures with a bounded range, [lower, upper]: their intervals are formed on the logit scale (evaluate/stats.py)
#: so they stay inside it (on a log scale when bounded on one side). Cosines and correlations lie in [-1, 1];
#: fractions, shares and accuracies in [0, 1]; explained variance below 1.
BOUNDS = Ranges({
    "cosine": (-1.0, 1.0), "dec_max_cos": (-1.0, 1.0), "dec_mean_abs_cos": (0.0, 1.0), "dead_fraction": (0.0, 1.0),
    "dense_fraction_0.01": (0.0, 1.0), "dense_fraction_0.1": (0.0, 1.0), "topic_significant_fraction": (0.0, 1.0),
    "unlearn_A_retain": (0.0, 1.0), "unlearn_A_forget": (0.0, 1.0), "unlearn_U": (0.0, 1.0),
    "unlearn_U_random": (0.0, 1.0), "coactivation_mean_abs_corr": (0.0, 1.0),
    "explained_variance": (-math.inf, 1.0),  # 1 - FVU: at most 1, unbounded below
}, {"smoothness_": (-1.0, 1.0), "probe_acc_k": (0.0, 1.0), "probe_block_acc_k": (0.0, 1.0),
    "probe_resid_acc_": (0.0, 1.0)})
