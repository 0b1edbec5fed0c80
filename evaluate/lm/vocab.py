"""Next-token statistics over the vocabulary (log p of the target, top-1, KL from a reference distribution)
for several sets of final hidden states at the same positions.

The 262k-way head dominates evaluate's language-model work, so the vocabulary is walked in blocks: each
block's logits (positions x block) are computed for every set while that block of the unembedding is in
cache, and running maxima, normalisers, argmaxes and KL sums are updated (the online log-sum-exp), so no
positions x vocabulary array is ever materialised and read again. The results are those of the full
log-softmax up to float32 rounding (tests/test_eval_downstream.py compares them with a direct float64
computation); the argmax is the first maximum, as `torch.argmax` of the full logits.

Shape suffixes: N positions, D model width, V vocabulary (a block of it: C), K top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from csae.evaluate.lm.passes import head_logits

#: Logit entries (positions x vocabulary) per block: 1M float32 = 4 MB, cache-sized.
BLOCK_ENTRIES = 2**20


@dataclass
class TokenStats:
    logp_N: torch.Tensor
    """log p(target) per position."""
    correct_N: torch.Tensor
    """Whether argmax of the logits is the target."""
    kl_N: torch.Tensor | None = None
    """KL(p_reference || p) per position (when a reference was given)."""
    top_NK: torch.Tensor | None = None
    """The `topk` highest-scoring token ids per position, best first (when asked for)."""


@torch.inference_mode()
def token_stats(model: Any, targets_N: torch.Tensor, hs: list[torch.Tensor], chunk: int,
                reference: int | None = None, topk: int = 0, block: int = 0) -> list[TokenStats]:
    """Next-token statistics for several final-hidden-state sets (each (N, D), same positions and
    targets), `chunk` positions at a time. When `reference` is an index into `hs`, every set also gets its
    KL from that set's distribution; `topk` keeps the best token ids of each position (from the full logits
    of each chunk). `block`: vocabulary entries per block (0: BLOCK_ENTRIES / chunk)."""
    n = len(targets_N)
    parts = [_stats(model, targets_N[s:s + chunk], [h[s:s + chunk] for h in hs], reference, topk,
                    block or max(256, BLOCK_ENTRIES // max(1, min(chunk, n))))
             for s in range(0, n, chunk)]
    if not parts:
        return [TokenStats(torch.empty(0), torch.empty(0, dtype=torch.bool),
                           torch.empty(0) if reference is not None else None,
                           torch.empty(0, topk, dtype=torch.long) if topk else None) for _ in hs]
    return [TokenStats(*(torch.cat([p[i][k] for p in parts]) if parts[0][i][k] is not None else None
                         for k in range(4))) for i in range(len(hs))]


def _stats(model: Any, targets_N: torch.Tensor, hs: list[torch.Tensor], reference: int | None, topk: int,
           block: int) -> list[tuple[torch.Tensor | None, ...]]:
    if topk:  # the candidates of the unlearning shortcut: the full logits of the (single) clean set
        out = []
        for h in hs:
            logits = head_logits(model, h).cpu()
            logp = logits.gather(1, targets_N.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=1)
            out.append((logp, logits.argmax(dim=1) == targets_N, None, logits.topk(topk, dim=1).indices))
        return out
    return _blocked(model, targets_N, hs, reference, block)


def _blocked(model: Any, targets_N: torch.Tensor, hs: list[torch.Tensor], reference: int | None,
             block: int) -> list[tuple[torch.Tensor | None, ...]]:
    """One walk over the vocabulary for every set: running max m, normaliser s = sum exp(l - m), first argmax,
    target logit; with a reference r, a_i = sum exp(l_r - m_r) (l_r - l_i), so that
    KL(p_r || p_i) = a_i / s_r - lse_r + lse_i."""
    param = next(model.get_output_embeddings().parameters())
    vocab, dev = model.get_output_embeddings().weight.shape[0], param.device
    hs = [h.to(dev, param.dtype) for h in hs]
    targets_N = targets_N.to(dev)
    k, n = len(hs), len(targets_N)
    f64 = {"dtype": torch.float64, "device": dev}
    m, s, a = torch.full((k, n), -math.inf, **f64), torch.zeros(k, n, **f64), torch.zeros(k, n, **f64)
    target, best = torch.zeros(k, n, device=dev), torch.full((k, n), -math.inf, device=dev)
    arg = torch.zeros(k, n, dtype=torch.long, device=dev)
    order = sorted(range(k), key=lambda i: i != reference)  # the reference first: the others need its block
    rows = torch.arange(n, device=dev)
    for start in range(0, vocab, block):
        stop = min(start + block, vocab)
        inside = (targets_N >= start) & (targets_N < stop)
        ref_logits = ref_e = None
        for i in order:
            logits = head_logits(model, hs[i], start, stop)
            top, where = logits.max(dim=1)  # first maximum within the block; strict > keeps the earliest block
            better = top > best[i]
            best[i], arg[i] = torch.where(better, top, best[i]), torch.where(better, where + start, arg[i])
            target[i, inside] = logits[rows[inside], targets_N[inside] - start]
            m_new = torch.maximum(m[i], top.double())
            e = logits.sub(m_new.float().unsqueeze(1)).exp_()
            rescale = torch.exp(m[i] - m_new)
            # the block's terms are <= 1 and summed pairwise in float32 (relative error ~log2(block) u, 1e-6),
            # the blocks in float64: a float64 sum of every entry costs 3x more (converting each one)
            s[i] = s[i] * rescale + e.sum(dim=1).double()
            m[i] = m_new
            if reference is None:
                continue
            if i == reference:
                ref_logits, ref_e = logits, e
                a *= rescale  # every a_i is a sum over the reference's exponentials
            else:
                a[i] += torch.einsum("nv,nv->n", ref_e, ref_logits - logits).double()  # type: ignore[operator]
    lse = m + s.log()
    out = []
    for i in range(k):
        kl = None
        if reference is not None:
            kl = (a[i] / s[reference] - lse[reference] + lse[i]).clamp_min(0).float().cpu()
            kl = torch.zeros(n) if i == reference else kl
        out.append(((target[i].double() - lse[i]).float().cpu(), (arg[i] == targets_N).cpu(), kl, None))
    return out
