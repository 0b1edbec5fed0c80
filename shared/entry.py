"""What an entry point (a command, or the Python API) sets up and library code never does: the environment
it reads (the model cache, torchrun's ranks and process group) and where the `csae` logger's records go.
Only entry points read the environment; library code takes these values as arguments."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import click

from csae.shared.ranks import Ranks


def cache_dir() -> Path:
    """Where converted models are cached: $CSAE_CACHE_DIR, else $XDG_CACHE_HOME/csae, else ~/.cache/csae."""
    if os.environ.get("CSAE_CACHE_DIR"):
        return Path(os.environ["CSAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csae"


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun job (a single process: rank 0 of 1)."""
    env = os.environ
    launched = "TORCHELASTIC_RUN_ID" in env  # torchrun's agent is our parent: the run's lock names it
    return Ranks(rank=int(env.get("RANK", "0")), world=int(env.get("WORLD_SIZE", "1")),
                 local_rank=int(env.get("LOCAL_RANK", "0")), launcher_pid=os.getppid() if launched else None)


@contextlib.contextmanager
def distributed(backend: str) -> Iterator[Ranks]:
    """Under torchrun: the process group (gloo on CPU, nccl on GPU) for the duration of the command."""
    ranks = ranks_from_env()
    if not ranks.distributed:
        yield ranks
        return
    import torch.distributed as dist

    dist.init_process_group(backend)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


class _ClickHandler(logging.Handler):
    """Log records to stderr through click (resolved at each record, so test runners that swap stderr see
    them): `warning: ...` for warnings and worse, the bare message for information."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        click.echo(prefix + self.format(record), err=True)


def configure_logging(level: int = logging.INFO) -> None:
    """Library code logs to the `csae` logger; the command line shows it on stderr (once per process)."""
    logger = logging.getLogger("csae")
    logger.setLevel(level)
    if not any(isinstance(h, _ClickHandler) for h in logger.handlers):
        logger.addHandler(_ClickHandler())
        logger.propagate = False
