"""Click plumbing shared by the three console scripts. Only CLI code reads the environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from shared.errors import UserError


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


class Group(click.Group):
    """A click group with variadic options and one-line errors for `UserError`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Every repeatable option of every subcommand takes several space-separated values.
        variadic = {name for cmd in self.commands.values() for p in cmd.params
                    if isinstance(p, click.Option) and p.multiple for name in p.opts}
        return super().parse_args(ctx, expand_variadic(args, sorted(variadic)))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


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
