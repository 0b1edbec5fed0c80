"""Test tolerances per compute dtype, each with its reason.

Rounding one result to a type with p significand bits moves it by at most u = 2^-p of its magnitude:
float32 u = 2^-24 (6e-8), bfloat16 u = 2^-8 (3.9e-3). Stored activations are always bfloat16. A
tolerance below allows the roundings by which the two computations compared can differ, and the tests
that use it also check that a real mistake (a wrong block, a missing soft-cap) lies far outside it.
"""

from __future__ import annotations

import torch

#: Largest per-row relative error ||stored - direct|| / ||direct|| of a harvested row against a direct
#: single-sequence transformers forward in the same dtype:
#: - float32 forward: the store rounds each element to bfloat16 once (<= 2^-8); batched and single-sequence
#:   float32 kernels differ by ~1e-7, enough to land on the neighbouring bfloat16 value: 2^-7.
#: - bfloat16 forward: every operation already rounds to bfloat16, the direct forward rounds the same way and
#:   the store adds nothing, but a batched kernel may round an operation differently from a single-sequence
#:   one, and the difference propagates through the blocks: 4 bfloat16 roundings, 2^-6.
#: Measured on the tiny Gemma-2 (layers 5, 12, 19): 2.4e-3 (float32) and 0 (bfloat16); neighbouring
#: layers differ by > 0.22.
ROW_TOLERANCE = {"float32": 2**-7, "bfloat16": 2**-6}


def row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over rows of ||got - want|| / ||want||."""
    got, want = got.double(), want.double()
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())

#: Relative tolerance of downstream CE (mean nats per prediction) and KL against independent single-sequence
#: full forwards of the same model in the same dtype (log-softmax in float64):
#: - float32: the paths differ in summation order only (~1e-7 per logit). Measured: 1e-8 (CE), 4e-6 (KL,
#:   a mean of differences of nearly equal log-probabilities, so it keeps fewer digits).
#: - bfloat16: the model rounds its soft-capped logits to bfloat16 where csae caps in float32: up to a few
#:   u = 2^-8 of the largest logit (< 1 in the tiny models) per logit, i.e. < 1e-2 nats per prediction at
#:   worst and ~1e-4 on average as the signs vary. Measured: 1.6e-5 (CE), 2.5e-4 (KL).
CE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-4}
KL_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-3}

#: Relative error (max |got - want| / max |want|) of final hidden states when the restarted forwards of several
#: interventions run stacked in one forward (`Restart.many`) against each run alone: every row meets the same
#: operations on the same values, only a kernel may block a sum differently for another number of rows.
#: - float32: a different blocking moves a sum by a few u = 2^-24 per block: 1e-6 (the issue's bound).
#: - bfloat16: one operation rounded to the neighbouring bfloat16 value propagates through the later blocks,
#:   as for harvested rows (ROW_TOLERANCE): 2^-6.
#: Measured on the tiny Gemma 3 (layer 1 of 4): 0 in float32 and in bfloat16.
BATCHED_RESTART_TOLERANCE = {"float32": 1e-6, "bfloat16": 2**-6}

#: |got - want| over max |want| of a T-SAE training step (loss, x_hat, every SAE gradient) against the dense
#: formula in float32 autograd (tests/test_train_tsae.py):
#: - float32: summation order only (the sparse path sums by feature, the formula by row): 1e-5, as the TopK and
#:   BatchTopK steps of tests/test_train_arch.py.
#: - bfloat16: every product's operands rounded (2 x 2^-9 relative each) through the encoder, both decodes,
#:   the cosine products and the gradients' products: a few 2^-8, so 2^-5; dropping the contrastive term
#:   or the prefix term moves the encoder's gradient by more than 5% of its largest element (checked there).
TSAE_STEP_TOLERANCE = {"float32": 1e-5, "bfloat16": 2**-5}
