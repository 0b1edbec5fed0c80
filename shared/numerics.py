"""How closely two computations of the same numbers must agree, per dtype.

Rounding one result to a floating-point type with p significand bits changes it by at most
u = 2^-p of its magnitude (the unit roundoff): float32 (p = 24) u = 6.0e-8, bfloat16 (p = 8) u = 3.9e-3.
A self-check that compares two ways of computing the same tensor allows as many roundings as the two
ways can differ by, times u, relative to the largest value compared; a real mistake (a missing
soft-cap, a wrong head, a wrong norm) changes values by far more than a handful of roundings, in either
dtype, as long as it moves the values by more than that relative amount (see the tests).
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p: the largest relative error of rounding one result to `dtype` (half its machine epsilon)."""
    return float(torch.finfo(dtype).eps) / 2


def rounding_tolerance(dtype: torch.dtype, roundings: int) -> float:
    """Relative tolerance for `roundings` independent roundings to `dtype`: roundings x u."""
    return roundings * unit_roundoff(dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the largest deviation relative to the largest value compared."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
