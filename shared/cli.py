"""Click plumbing shared by the three console scripts. Only CLI code reads the environment."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from csae import __version__
from csae.shared.errors import UserError
from csae.shared.ranks import Ranks


def expand_variadic(args: Sequence[str], variadic: Sequence[str]) -> list[str]:
    """`--layers 5 12 19 --x` -> `--layers 5 --layers 12 --layers 19 --x` for the options in `variadic`.

    Click has no option that takes a variable number of values, but a repeated (`multiple=True`)
    option collects them, so the values after a variadic option are given its name again.
    """
    out: list[str] = []
    current: str | None = None
    for arg in args:
        if arg.startswith("-") and not _is_number(arg):
            name, eq, value = arg.partition("=")
            current = name if name in variadic else None
            if current and eq:
                out += [current, value]
            elif not current:
                out.append(arg)
        elif current is not None:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


class Group(click.Group):
    """A click group with variadic options, `--version`, logging to stderr and one-line errors for `UserError`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        click.version_option(__version__, "--version", package_name="csae", prog_name="csae")(self)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Every repeatable option of every subcommand takes several space-separated values.
        variadic = {name for cmd in self.commands.values() for p in cmd.params
                    if isinstance(p, click.Option) and p.multiple for name in p.opts}
        return super().parse_args(ctx, expand_variadic(args, sorted(variadic)))

    def invoke(self, ctx: click.Context) -> Any:
        configure_logging()
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # commands with something to resume say how themselves
            click.echo("error: interrupted", err=True)
            sys.exit(130)


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


#: The activation store every command reads or writes unless told otherwise.
DEFAULT_STORE = "acts.zarr"


def store_option(help_text: str) -> Callable[[Callable], Callable]:
    """`--store`: a local path or an fsspec URL (s3://..., gs://..., file://..., memory://...), passed on unchanged."""
    return click.option("--store", type=str, default=DEFAULT_STORE, show_default=True,
                        help=f"{help_text} A local path or an fsspec URL (s3://bucket/acts.zarr).")


def params_option(section: str, more: str = "") -> Callable[[Callable], Callable]:
    """`--params FILE`: read a stage's settings from one section of a YAML file (DVC's params.yaml)."""
    return click.option("--params", type=click.Path(exists=True, dir_okay=False), default=None,
                        help=f"Read settings from the `{section}` section of this YAML file (DVC's params.yaml)"
                             f"{more}; options given on the command line override it.")


def cache_dir() -> Path:
    """Where converted models are cached: $CSAE_CACHE_DIR, else $XDG_CACHE_HOME/csae, else ~/.cache/csae."""
    if os.environ.get("CSAE_CACHE_DIR"):
        return Path(os.environ["CSAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csae"
