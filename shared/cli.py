"""Click plumbing shared by the console scripts: variadic options, `--version`, one-line errors, common options."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from csae.shared.entry import configure_logging
from csae.shared.errors import UserError
from csae.shared.version import __version__


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
