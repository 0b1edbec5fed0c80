"""Where evaluate's time goes: seconds per part of a family, accumulated over SAEs and batches, written to
eval_config.json's timings (`<family>_<part>_s`) so a profile comes with every run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Clock:
    """Accumulates wall time per part into `into` (nothing when `into` is None) under `<prefix>_<part>_s`."""

    def __init__(self, prefix: str, into: dict[str, float] | None) -> None:
        self.prefix, self.into = prefix, into

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.into is not None:
                key = f"{self.prefix}_{part}_s"
                self.into[key] = self.into.get(key, 0.0) + time.perf_counter() - t0
