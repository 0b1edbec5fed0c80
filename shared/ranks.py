"""Where this process sits in a torchrun job, and the few collective steps harvest and train need.

The CLI reads torchrun's environment (`csae.shared.entry.ranks_from_env`) and sets up the process group;
library code gets a `Ranks` and never reads the environment itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from csae.shared.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    """This process's index on its host (which GPU it takes)."""
    launcher_pid: int | None = None
    """torchrun's pid: the run's lock is held in its name."""

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; its result, or its one-line error, reaches every rank."""
        if not self.distributed:
            return fn()
        result: Any = None
        error: str | None = None
        if self.main:
            try:
                result = fn()
            except UserError as err:
                error = str(err)
            except BaseException as err:
                self.broadcast((None, f"rank 0 failed ({type(err).__name__}: {err})"))
                raise
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UserError(error)
        return result
