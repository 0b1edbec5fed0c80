"""Downstream loss: splice each SAE's reconstruction (or zeros) into the model at its layer and compare
next-token cross-entropy and KL to the clean model on held-out text.

All interventions share one clean pass per batch, and each chunk of clean log-probabilities is computed
once and compared with every intervention, so the 262k-way log-softmax runs 1 + (interventions) times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from csae.evaluate.lm import Restart, check_head, clean_pass, token_stats
from csae.evaluate.reconstruction import ce_score, kl_score
from csae.evaluate.text import TextBatch

#: (residual (B, T, D) float32, text mask (B, T)) -> the residual to splice in.
Splice = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def zero_splice(resid_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
    """Zero-ablation of the layer's output at text positions (BOS and padding keep their value)."""
    return torch.where(text_BT.unsqueeze(-1), torch.zeros_like(resid_BTD), resid_BTD)


def sae_splice(sae: torch.nn.Module) -> Splice:
    """The SAE's reconstruction at text positions (the store never holds BOS, so BOS keeps its value)."""

    def splice(resid_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x_hat = sae(resid_BTD.to(sae.W_enc.dtype))[0].float()
        return torch.where(text_BT.unsqueeze(-1), x_hat, resid_BTD)

    return splice


@dataclass
class _Sums:
    nll: float = 0.0
    kl: float = 0.0
    n: int = 0


@dataclass
class DownstreamResult:
    ce_clean: float
    ce: dict[Any, float] = field(default_factory=dict)
    """Mean next-token CE per intervention key."""
    kl: dict[Any, float] = field(default_factory=dict)
    """Mean KL(p_clean || p_intervened) per intervention key."""
    n_predictions: int = 0


def downstream_losses(model: Any, text: list[TextBatch], interventions: dict[Any, tuple[int, Splice]],
                      chunk: int, progress: bool = True) -> DownstreamResult:
    """Mean CE (nats) of the clean model and of every intervention {key: (layer, splice)}, plus each
    intervention's mean KL from the clean model, over all predictions in `text`."""
    layers = sorted({layer for layer, _ in interventions.values()})
    clean_sum, sums = _Sums(), {k: _Sums() for k in interventions}
    restart: Restart | None = None
    verified: set[int] = set()
    bar = tqdm(total=sum(b.n_predictions for b in text), unit="tok", desc="downstream CE/KL", disable=not progress)
    for batch in text:
        clean = clean_pass(model, batch, layers)
        if restart is None:
            check_head(model, batch)
            restart = Restart(model, clean.tuple_out)
        pred = batch.pred_BT
        targets = batch.targets_BT[pred]
        hs = [clean.final_BTD[pred]]
        for layer, splice in interventions.values():
            if layer not in verified:
                restart.verify(batch, clean, layer)
                verified.add(layer)
            resid = splice(clean.resid[layer], batch.text_BT)
            hs.append(restart(batch.ids_BT, layer, resid)[pred])
        stats = token_stats(model, targets, hs, chunk, reference=0)
        clean_sum.nll -= float(stats[0].logp_N.double().sum())
        clean_sum.n += len(targets)
        for key, st in zip(interventions, stats[1:], strict=True):
            sums[key].nll -= float(st.logp_N.double().sum())
            sums[key].kl += float(st.kl_N.double().sum())  # type: ignore[union-attr]
            sums[key].n += len(targets)
        bar.update(len(targets))
    bar.close()
    n = max(clean_sum.n, 1)
    return DownstreamResult(ce_clean=clean_sum.nll / n, ce={k: s.nll / n for k, s in sums.items()},
                            kl={k: s.kl / n for k, s in sums.items()}, n_predictions=clean_sum.n)


def downstream_metrics(result: DownstreamResult, key: Any, zero_key: Any) -> dict[str, float]:
    """CE and KL scores of intervention `key` against the zero-ablation `zero_key` of the same layer."""
    ce_sae, ce_zero, kl_sae, kl_zero = result.ce[key], result.ce[zero_key], result.kl[key], result.kl[zero_key]
    return {"ce_clean": result.ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero,
            "ce_loss_increase": ce_sae - result.ce_clean,
            "ce_score": ce_score(result.ce_clean, ce_sae, ce_zero), "kl_sae": kl_sae, "kl_zero": kl_zero,
            "kl_score": kl_score(kl_sae, kl_zero), "ce_predictions": result.n_predictions}
