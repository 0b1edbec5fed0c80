"""The device and dtype policy: what `auto` means for a stage's device and compute dtype on this machine.

Every stage resolves `device` and `dtype` once, at its start, through these functions, and records the
resolved values with its outputs (docs/dtype.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Where Linux lists the CPU's instruction-set flags.
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 where the hardware has fast bfloat16 matmuls, else float32 (CPUs without
    AVX512-BF16/AMX-BF16 emulate bfloat16 products, several times slower than float32: docs/dtype.md)."""
    if dtype != "auto":
        return dtype
    dev = resolve_device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def timed_dtypes(device: str = "cpu") -> list[str]:
    """The compute dtypes a benchmark times here by default: float32, and bfloat16 where `auto` resolves to it
    (elsewhere torch emulates bfloat16 products, which says nothing about training speed)."""
    return ["float32"] + (["bfloat16"] if resolve_dtype("auto", device) == "bfloat16" else [])


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16); else torch emulates it."""
    try:
        flags = CPUINFO.read_text()
    except OSError:  # not Linux: assume emulated bfloat16 (the safe choice for speed)
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
