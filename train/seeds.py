"""Every random stream of training, derived from (seed, purpose[, step]) alone: what makes a resumed run repeat an
uninterrupted one exactly, and runs that share a seed (the CSAE and its baseline) start from the same weights."""

from __future__ import annotations

import functools

import numpy as np
import torch

#: What each random stream is for (the second key of derive_seed).
INIT_SAE, INIT_HEAD, DATA, DIVERSITY, VIEWS, RESAMPLE = range(6)
#: Per-step seeds are drawn a block of steps at a time: a SeedSequence per step costs ~1% of a training step.
SEED_BLOCK = 1024


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on `keys` (numpy's SeedSequence mixes them, so nearby keys give
    unrelated streams: seed 1's initialisation is not seed 0's head initialisation)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


@functools.lru_cache(maxsize=16)
def _step_seeds(seed: int, purpose: int, block: int) -> np.ndarray:
    """63-bit seeds of steps [block, block + 1) * SEED_BLOCK of one stream (four keys: never the keys of a
    derive_seed call)."""
    return np.random.SeedSequence([seed, purpose, block, SEED_BLOCK]).generate_state(SEED_BLOCK, np.uint64) >> 1


def step_generator(seed: int, step: int, purpose: int, out: torch.Generator) -> torch.Generator:
    """`out` re-seeded so that it depends only on (seed, step, purpose), and returned (manual_seed resets a
    generator's whole state, so reusing one generator costs nothing in exactness)."""
    block, i = divmod(step, SEED_BLOCK)
    return out.manual_seed(int(_step_seeds(seed, purpose, block)[i]))
