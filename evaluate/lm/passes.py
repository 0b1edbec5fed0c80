"""Language-model passes for downstream metrics: a clean pass that caches the residual stream, forwards
that restart from a (modified) residual at layer L, and next-token statistics with the vocabulary
log-softmax computed in chunks of positions.

Restarting at layer L: blocks 0..L are temporarily replaced by stubs that return the given residual, so
only the blocks after L, the final norm and the LM head run (the embedding lookup and mask/rotary set-up
still run; they are cheap). `Restart.verify` checks, on real data, that this reproduces the clean model
exactly enough; if it does not (an architecture whose blocks do more than map hidden states), `mode`
falls back to full forwards with a hook that replaces block L's output.

Shape suffixes: B sequences, T positions, D model width, N selected positions, V vocabulary.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from csae.evaluate.lm.text import TextBatch
from csae.shared.errors import UserError
from csae.shared.lm.models import LoadedModel, base_model, blocks, load_model
from csae.shared.lm.residual import block_output
from csae.shared.numerics import relative_error, rounding_tolerance
from csae.shared.store.schema import ActivationStore

log = logging.getLogger(__name__)

#: Roundings by which the restarted forward may differ from the clean one. It runs the same operations on
#: the same values (the stubs hand back exactly the clean residual), so it agrees to the last bit on CPU;
#: 8 leaves room for kernels that block a sum differently. A block that does more than map hidden states
#: changes the result by far more.
RESTART_ROUNDINGS = 8
#: Roundings by which the model's own logits may differ from `head_logits` on the same final state: the
#: model may round its head's output and each of the soft-cap's three operations (divide, tanh, multiply)
#: to its dtype where `head_logits` works in float32 (4), doubled for the tanh approximation's own error.
#: Measured on a tiny Gemma-2 in bfloat16: 0.8 u. A left-out soft-cap or a wrong head is caught whenever
#: it moves the largest logit by more than 8 u (3% in bfloat16, 5e-7 in float32).
HEAD_ROUNDINGS = 8
#: Tokens (rows x positions) per restarted forward when the restarts of several interventions run together
#: (`Restart.many`): the blocks' matmuls reach full speed well below this, and a forward's activations stay
#: near 100 MB at d = 640 in float32.
RESTART_TOKENS = 8192


def load_lm(store: ActivationStore, cache_dir: Path, *, model: str | None, dtype: str, device: str) -> LoadedModel:
    """The language model the store was harvested with (or `model`), checked against the store's width and
    layers. `dtype` is a resolved compute dtype."""
    hcfg = store.harvest_config
    name = model or hcfg.model
    lm = load_model(name, cache_dir=cache_dir, dtype=dtype, device=device, revision=None if model else hcfg.revision)
    if lm.d_model != store.d_model:
        raise UserError(f"model {name!r} has width {lm.d_model}, but the store's activations have {store.d_model}: "
                        f"pass the model the store was harvested with (--model)")
    too_deep = [x for x in store.layers if x >= lm.n_layers]
    if too_deep:
        raise UserError(f"model {name!r} has {lm.n_layers} blocks; the store's layers {too_deep} do not exist in it")
    return lm


@dataclass
class CleanPass:
    resid: dict[int, torch.Tensor]
    """{layer: residual after block L, (B, T, D) float32}."""
    final_BTD: torch.Tensor
    """The final hidden state (after the final norm), float32."""
    tuple_out: bool
    """Whether blocks return tuples (the stubs must mimic it)."""


@torch.inference_mode()
def clean_pass(model: Any, batch: TextBatch, layers: list[int], *, final: bool = True) -> CleanPass:
    """One forward of the unmodified model, capturing block outputs at `layers`. With final=False the
    forward stops after the deepest layer (no final hidden state)."""
    stack = blocks(model)
    out: dict[int, torch.Tensor] = {}
    kinds: list[bool] = []
    deepest = max(layers) if layers else -1

    class _Stop(Exception):
        pass

    def capture(layer: int) -> Any:
        def hook(_m: Any, _i: Any, output: Any) -> None:
            kinds.append(isinstance(output, tuple))
            out[layer] = block_output(output).float()
            if not final and layer == deepest:
                raise _Stop

        return hook

    handles = [stack[layer].register_forward_hook(capture(layer)) for layer in layers]
    device = next(model.parameters()).device
    try:
        hidden = base_model(model)(input_ids=batch.ids_BT.to(device), use_cache=False).last_hidden_state.float()
    except _Stop:
        hidden = torch.empty(0)
    finally:
        for h in handles:
            h.remove()
    return CleanPass({k: v.cpu() for k, v in out.items()}, hidden.cpu(), bool(kinds and kinds[0]))


class Restart:
    """Final hidden states of the model when block L's output is replaced by a given residual."""

    def __init__(self, model: Any, tuple_out: bool) -> None:
        self.model = model
        self.tuple_out = tuple_out
        self.mode = "skip"

    @contextmanager
    def _stubs(self, layer: int, resid_BTD: torch.Tensor) -> Any:
        stack = blocks(self.model)
        value = (resid_BTD,) if self.tuple_out else resid_BTD

        def stub(*_args: Any, **_kwargs: Any) -> Any:
            return value

        for i in range(layer + 1):
            stack[i].forward = stub
        try:
            yield
        finally:
            for i in range(layer + 1):
                del stack[i].forward

    @contextmanager
    def _hook(self, layer: int, resid_BTD: torch.Tensor) -> Any:
        def replace(_m: Any, _i: Any, output: Any) -> Any:
            return (resid_BTD, *output[1:]) if isinstance(output, tuple) else resid_BTD

        handle = blocks(self.model)[layer].register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    @torch.inference_mode()
    def __call__(self, ids_BT: torch.Tensor, layer: int, resid_BTD: torch.Tensor) -> torch.Tensor:
        """Final hidden state (B, T, D) float32 with block `layer` outputting `resid_BTD`."""
        param = next(self.model.parameters())
        resid = resid_BTD.to(param.device, param.dtype)
        patch = self._stubs if self.mode == "skip" else self._hook
        with patch(layer, resid):
            out = base_model(self.model)(input_ids=ids_BT.to(param.device), use_cache=False)
        return out.last_hidden_state.float().cpu()

    @torch.inference_mode()
    def many(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], layer: int, tokens: int = RESTART_TOKENS,
             stops: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Final hidden states of several restarts at one layer, [(ids (R_i, T), residual (R_i, T, D))] with
        one T, stacked into forwards of about `tokens` tokens: the restarts of every SAE of a layer (and their
        references) share forwards. Each row depends only on itself (causal attention within a sequence), so
        the result is the one-at-a-time result up to the kernels' blocking (float32: ~1e-7 relative; tested).

        `stops` (per job, (R_i,)): each row is needed at positions [0, stop) only. Causal attention lets a
        forward end at its rows' last stop, so rows go into forwards in order of stop; positions at or past a
        row's stop are left 0, and a row with stop 0 runs no forward."""
        if not jobs:
            return []
        ids = torch.cat([i for i, _ in jobs])
        resid = torch.cat([r for _, r in jobs])
        n, t = ids.shape
        stop = torch.cat(stops).long() if stops is not None else torch.full((n,), t)
        order = torch.argsort(stop, stable=True).tolist()
        stop_list = stop.tolist()
        out = torch.zeros(n, t, resid.shape[2])
        s = next((i for i, r in enumerate(order) if stop_list[r] > 0), n)
        while s < n:
            e = s + 1  # widest run of rows (in order of stop) whose forward stays within `tokens`
            while e < n and (e + 1 - s) * stop_list[order[e]] <= tokens:
                e += 1
            rows, end = torch.tensor(order[s:e]), stop_list[order[e - 1]]
            out[rows, :end] = self(ids[rows, :end], layer, resid[rows, :end])
            s = e
        out[torch.arange(t) >= stop.unsqueeze(1)] = 0.0  # a shared forward ran some rows past their stops
        return list(out.split([len(i) for i, _ in jobs]))

    @torch.inference_mode()
    def verify(self, batch: TextBatch, clean: CleanPass, layer: int) -> None:
        """Restart from the clean residual must give the clean final state; else use full forwards."""
        if self.mode != "skip":
            return
        got = self(batch.ids_BT, layer, clean.resid[layer])
        mask = batch.text_BT
        err = relative_error(got[mask], clean.final_BTD[mask])
        tolerance = rounding_tolerance(next(self.model.parameters()).dtype, RESTART_ROUNDINGS)
        if not err <= tolerance:
            log.warning("restarting the forward at block %d does not reproduce the clean model (relative error "
                        "%.2g, tolerance %.2g); using full forwards instead (slower)", layer, err, tolerance)
            self.mode = "hook"


def head_logits(model: Any, h_ND: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Logits (N, V) from final hidden states, as the model computes them (incl. Gemma's soft-capping); of
    the vocabulary entries [start, stop) only, when given (evaluate/lm/vocab.py walks the head in blocks)."""
    head = model.get_output_embeddings()
    weight = head.weight[start:stop]
    bias = head.bias[start:stop] if getattr(head, "bias", None) is not None else None
    logits = torch.nn.functional.linear(h_ND.to(weight.device, weight.dtype), weight, bias).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def check_head(model: Any, batch: TextBatch) -> None:
    """`head_logits` of the final hidden state must equal the model's own logits, within HEAD_ROUNDINGS.

    Both come from one forward of the batch's first sequence alone, so they share the final hidden state
    and only the head's arithmetic is compared (batched and single-sequence forwards may round apart).
    """
    param = next(model.parameters())
    ids = batch.ids_BT[:1, : int(batch.lengths_B[0])].to(param.device)
    final_TD = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    want = model(input_ids=ids, use_cache=False).logits[0]
    err = relative_error(head_logits(model, final_TD), want)
    tolerance = rounding_tolerance(param.dtype, HEAD_ROUNDINGS)
    if not err <= tolerance:
        raise RuntimeError(f"computing logits from the final hidden state disagrees with the model's own "
                           f"forward (relative error {err:.2g}, tolerance {tolerance:.2g} in {param.dtype}); "
                           f"this architecture is not supported yet")


# ----- exact top-1 accuracy without the full head -----------------------------------------------------------
#
# A known token stays right under an intervention when its logit still beats every other token's. For the
# clean top-k tokens (candidates) the new logits are computed exactly; any other token v had a clean logit
# at most the (k+1)-th largest, and a change d of the final hidden state moves it by W_v . d <= |W_v| |d|
# <= M |d| (M: the largest unembedding row norm). So the target stays first when it beats the other
# candidates and the (k+1)-th clean logit plus M |d|; it is certainly wrong when another candidate beats it;
# only in between does the full head run. Margins allow for the head's rounding in the model's dtype, so
# the verdict equals `head_logits(...).argmax() == target` (tested in both dtypes).

#: Clean candidates kept per known position: their logits cost k x d instead of the head's V x d.
SHORTCUT_CANDIDATES = 64


@dataclass
class Top1Reference:
    """What the shortcut needs at each known position (clean argmax = target)."""

    h_ND: torch.Tensor
    """Clean final hidden state (float32)."""
    cand_NK: torch.Tensor
    """The clean top-k token ids, target first."""
    out_N: torch.Tensor
    """Exact clean logit (float64) of the (k+1)-th token: no token outside the candidates scored higher,
    up to the head's rounding."""


def _unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(W (V, D) as the model holds it, its bias or None, the largest row norm M (computed once per model))."""
    head = model.get_output_embeddings()
    w = head.weight.detach()
    b = head.bias.detach() if getattr(head, "bias", None) is not None else None
    m = getattr(model, "_csae_unembedding_norm", None)
    if m is None:
        m = max(float(w[s:s + 65536].double().norm(dim=1).max()) for s in range(0, len(w), 65536))
        model._csae_unembedding_norm = m
    return w, b, m


def _exact_logits(model: Any, h_ND: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """Logits of the given token ids in float64 (exact up to float64 rounding), shape (N, K)."""
    w, b, _ = _unembedding(model)
    ids = ids_NK.to(w.device)
    out = torch.einsum("nkd,nd->nk", w[ids].double(), h_ND.to(w.device).double()).cpu()
    return out + b[ids].double().cpu() if b is not None else out


def _rounding(model: Any, h_ND: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """Bound on |computed - exact| of one logit: the output rounding to the model's dtype (u |logit|) plus
    float32 accumulation over d terms (d 2^-24 M |h|)."""
    _, _, m = _unembedding(model)
    u = float(torch.finfo(next(model.parameters()).dtype).eps) / 2
    return u * scale_N + h_ND.shape[1] * 2.0**-24 * m * h_ND.double().norm(dim=1)


def top1_reference(model: Any, h_ND: torch.Tensor, targets_N: torch.Tensor, top_NK: torch.Tensor) -> Top1Reference:
    """From the clean final states of known positions (argmax = target), their targets and their clean
    top-(k+1) ids. The target goes first (top-k may order tied logits differently from argmax); when top_NK
    holds the whole vocabulary, every token is a candidate and nothing lies outside."""
    others = torch.stack([row[row != t][: top_NK.shape[1] - 1] for row, t in zip(top_NK, targets_N, strict=True)]) \
        if len(top_NK) else top_NK[:, 1:]
    ids = torch.cat([targets_N.unsqueeze(1), others], dim=1)
    exact = _exact_logits(model, h_ND, ids)
    if top_NK.shape[1] >= model.get_output_embeddings().weight.shape[0]:
        return Top1Reference(h_ND.float(), ids, torch.full((len(h_ND),), -math.inf, dtype=torch.float64))
    slack = 2 * _rounding(model, h_ND, exact.abs().max(dim=1).values)  # computed order vs exact order
    return Top1Reference(h_ND.float(), ids[:, :-1].clone(), exact[:, -1] + slack)


@torch.inference_mode()
def still_top1(model: Any, ref: Top1Reference, h_new_ND: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """(whether each known position's target is still the argmax of the logits of h_new, how many
    positions needed the full head)."""
    _, _, m = _unembedding(model)
    exact = _exact_logits(model, h_new_ND, ref.cand_NK)
    target = exact[:, 0]
    other = exact[:, 1:].max(dim=1).values if exact.shape[1] > 1 else torch.full_like(target, -math.inf)
    out = ref.out_N + m * (h_new_ND.double() - ref.h_ND.double()).norm(dim=1)
    finite = [v.abs().nan_to_num(0.0, posinf=0.0) for v in (target, other, out)]  # -inf: no such token
    scale = torch.stack(finite).max(dim=0).values
    err = 2 * _rounding(model, h_new_ND, scale)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    saturated = (scale > 4 * cap) if cap else torch.zeros_like(target, dtype=torch.bool)  # tanh flattens ties
    right = (target > other + err) & (target > out + err) & ~saturated
    wrong = (other > target + err) & ~saturated
    result = right.clone()
    unsure = torch.nonzero(~(right | wrong)).squeeze(1)
    for s in range(0, len(unsure), chunk):
        idx = unsure[s:s + chunk]
        logits = head_logits(model, h_new_ND[idx])
        result[idx] = logits.argmax(dim=1).cpu() == ref.cand_NK[idx, 0]
    return result, len(unsure)
