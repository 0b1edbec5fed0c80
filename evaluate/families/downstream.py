"""Downstream family: splice each SAE's reconstruction (or zeros) into the model at its layer and compare
next-token cross-entropy and KL to the clean model on held-out text, in two conventions:

- csae's: the SAE and the zero-ablation replace the layer's output at text positions only (BOS and padding
  keep their value; the store holds no BOS rows, so the SAE never saw one). `ce_score`, `kl_score`.
- SAELens': as its `get_recons_loss` inside `run_evals` with the special tokens ignored: the SAE at text
  positions, the zero-ablation at every position (BOS zeroed too). `ce_score_saelens`, `kl_score_saelens`.

Both score the same predictions (every text position but the last), so only the zero-ablation reference
differs. All interventions share one clean pass per batch, and the clean and every intervention's logits
are walked block by block over the vocabulary together (evaluate/lm/vocab.py), so the 262k-way head runs
1 + (interventions) times per prediction and no log-softmax is materialised. Sums are kept per document,
the bootstrap's unit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.lm.clock import Clock
from csae.evaluate.lm.passes import Restart, check_head, clean_pass
from csae.evaluate.lm.text import TextBatch, TextSource, text_batches
from csae.evaluate.lm.vocab import token_stats
from csae.evaluate.stats import FamilyResult, Figure, Units, additive
from csae.shared.config.evaluate import EvalConfig
from csae.shared.lm.models import LoadedModel

log = logging.getLogger(__name__)

#: (residual (B, T, D) float32, text mask (B, T)) -> the residual to splice in.
Splice = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def zero_splice(resid_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
    """Zero-ablation of the layer's output at text positions (BOS and padding keep their value)."""
    return torch.where(text_BT.unsqueeze(-1), torch.zeros_like(resid_BTD), resid_BTD)


def zero_all_splice(resid_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
    """Zero-ablation at every position, BOS included (SAELens' reference)."""
    return torch.zeros_like(resid_BTD)


def sae_splice(sae: torch.nn.Module) -> Splice:
    """The SAE's reconstruction at text positions (the store never holds BOS, so BOS keeps its value)."""

    def splice(resid_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x_hat = sae(resid_BTD.to(sae.W_enc.dtype))[0].float()
        return torch.where(text_BT.unsqueeze(-1), x_hat, resid_BTD)

    return splice


@dataclass
class DownstreamResult:
    """Per-document sums over the scored predictions (D documents)."""

    n_D: np.ndarray
    nll_clean_D: np.ndarray
    nll: dict[Any, np.ndarray] = field(default_factory=dict)
    """Sum of -log p(target) per intervention key."""
    kl: dict[Any, np.ndarray] = field(default_factory=dict)
    """Sum of KL(p_clean || p_intervened) per intervention key."""

    @property
    def n_predictions(self) -> int:
        return int(self.n_D.sum())

    def ce(self, key: Any) -> float:
        return float(self.nll[key].sum() / self.n_D.sum())


def downstream_losses(model: Any, text: list[TextBatch], interventions: dict[Any, tuple[int, Splice]],
                      chunk: int, progress: bool = True, clock: Clock | None = None) -> DownstreamResult:
    """Per-document CE sums of the clean model and of every intervention {key: (layer, splice)}, plus each
    intervention's KL from the clean model, over all predictions in `text`."""
    layers = {layer for layer, _ in interventions.values()}
    d = 1 + max(int(b.doc_B.max()) for b in text)
    res = DownstreamResult(np.zeros(d), np.zeros(d), {k: np.zeros(d) for k in interventions},
                           {k: np.zeros(d) for k in interventions})
    clock = clock or Clock("downstream", None)
    restart: Restart | None = None
    verified: set[int] = set()
    bar = tqdm(total=sum(b.n_predictions for b in text), unit="tok", desc="downstream CE/KL", disable=not progress)
    for batch in text:
        with clock("blocks"):
            clean = clean_pass(model, batch, sorted(layers))
        if restart is None:
            with clock("head"):
                check_head(model, batch)
            restart = Restart(model, clean.tuple_out)
        pred = batch.pred_BT
        with clock("blocks"):
            for layer in layers - verified:
                restart.verify(batch, clean, layer)
            verified |= layers
            finals = restarted(restart, batch, clean.resid, interventions)
        hs = [clean.final_BTD[pred], *(finals[key][pred] for key in interventions)]
        with clock("head"):
            stats = token_stats(model, batch.targets_BT[pred], hs, chunk, reference=0)
        docs = batch.pred_docs().numpy()

        def add(sums: np.ndarray, values: torch.Tensor, docs: np.ndarray = docs) -> None:
            sums += np.bincount(docs, weights=values.double().numpy(), minlength=d)

        add(res.n_D, torch.ones(len(docs)))
        add(res.nll_clean_D, -stats[0].logp_N)
        for key, st in zip(interventions, stats[1:], strict=True):
            add(res.nll[key], -st.logp_N)
            add(res.kl[key], st.kl_N)  # type: ignore[arg-type]
        bar.update(len(docs))
    bar.close()
    return res


def restarted(restart: Restart, batch: TextBatch, resid: dict[int, torch.Tensor],
              interventions: dict[Any, tuple[int, Splice]]) -> dict[Any, torch.Tensor]:
    """Final hidden states (B, T, D) of every intervention on one batch; the restarts of one layer (every SAE
    of it and its zero-ablations) share forwards (`Restart.many`)."""
    out: dict[Any, torch.Tensor] = {}
    for layer in sorted({layer for layer, _ in interventions.values()}):
        keys = [k for k, (at, _) in interventions.items() if at == layer]
        jobs = [(batch.ids_BT, interventions[k][1](resid[layer], batch.text_BT)) for k in keys]
        out.update(zip(keys, restart.many(jobs, layer), strict=True))
    return out


def downstream_figures(res: DownstreamResult, key: Any, zero: Any, zero_all: Any) -> dict[str, Figure]:
    """CE and KL scores of intervention `key` against the zero-ablations of its layer (text positions:
    `zero`; every position: `zero_all`), plus the CEs and KLs themselves (means per prediction)."""
    cols = np.stack([res.n_D, res.nll_clean_D, res.nll[key], res.nll[zero], res.nll[zero_all], res.kl[key],
                     res.kl[zero], res.kl[zero_all]], axis=1)
    n, clean, sae, z, za, kl_sae, kl_z, kl_za = range(8)

    def fig(fn: Callable[[np.ndarray], np.ndarray]) -> Figure:
        return additive(cols, fn)

    return {
        "ce_score": fig(lambda t: (t[:, z] - t[:, sae]) / (t[:, z] - t[:, clean])),
        "kl_score": fig(lambda t: (t[:, kl_z] - t[:, kl_sae]) / t[:, kl_z]),
        "ce_score_saelens": fig(lambda t: (t[:, za] - t[:, sae]) / (t[:, za] - t[:, clean])),
        "kl_score_saelens": fig(lambda t: (t[:, kl_za] - t[:, kl_sae]) / t[:, kl_za]),
        "ce_loss_increase": fig(lambda t: (t[:, sae] - t[:, clean]) / t[:, n]),
        "ce_clean": fig(lambda t: t[:, clean] / t[:, n]),
        "ce_sae": fig(lambda t: t[:, sae] / t[:, n]),
        "ce_zero": fig(lambda t: t[:, z] / t[:, n]),
        "ce_zero_saelens": fig(lambda t: t[:, za] / t[:, n]),
        "kl_sae": fig(lambda t: t[:, kl_sae] / t[:, n]),
        "kl_zero": fig(lambda t: t[:, kl_z] / t[:, n]),
        "kl_zero_saelens": fig(lambda t: t[:, kl_za] / t[:, n]),
    }


def downstream(lm: LoadedModel, ckpts: list[LayerCheckpoint], src: TextSource, cfg: EvalConfig,
               progress: bool, timings: dict[str, float] | None = None) -> FamilyResult | None:
    """The family: CE/KL figures of every checkpoint on cfg.ce_tokens predictions of held-out text."""
    text = text_batches(lm.tokenizer, src.documents(), src.context, cfg.ce_tokens, cfg.lm_batch_size,
                        per_doc=cfg.ce_doc_predictions)
    if not text:
        log.warning("corpus %r has no held-out text; downstream CE/KL skipped", src.dataset)
        return None
    layers = sorted({c.layer for c in ckpts})
    interventions: dict[Any, tuple[int, Splice]] = {("zero", layer): (layer, zero_splice) for layer in layers}
    interventions.update({("zero_all", layer): (layer, zero_all_splice) for layer in layers})
    interventions.update({c.key: (c.layer, sae_splice(c.sae)) for c in ckpts})
    res = downstream_losses(lm.model, text, interventions, cfg.logit_chunk, progress=progress,
                            clock=Clock("downstream", timings))
    figures = {c.key: downstream_figures(res, c.key, ("zero", c.layer), ("zero_all", c.layer)) for c in ckpts}
    extras = {c.key: {"ce_predictions": res.n_predictions, "ce_docs": len(res.n_D)} for c in ckpts}
    return FamilyResult(Units((len(res.n_D),)), figures, extras)
