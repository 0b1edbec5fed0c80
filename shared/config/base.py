"""Frozen-dataclass configs that describe themselves.

Each field is declared once, with its type, its default and a docstring (the string literal right
after it). The docstring is the field's `--help` text, `to_dict`/`from_dict` give the form saved next
to every output, and `click_options` turns a config class into CLI options. CLI options default to
"not given" (None) so that a value the user typed can be told apart from the dataclass default; that is
what lets a preset supply defaults of its own.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from csae.shared.errors import UserError

C = TypeVar("C")


class ConfigError(UserError):
    """A config value is invalid; the message says which and how to fix it."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (and its dataclass bases), whitespace folded."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for prev, node in itertools.pairwise(body):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def check_finite(cfg: Any) -> None:
    """Every float of a config (fields and their lists) is finite: NaN or infinity from a params file
    (`.nan`), `--set` or Python is a one-line ConfigError, before any comparison lets it through. Every
    config's `__post_init__` calls this first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else
                                                                       (value,))):
            raise ConfigError(f"{f.name}: {value!r} is not a finite number; fix the value of `{f.name}`")


def check_distinct(name: str, values: tuple[int, ...] | list[int]) -> None:
    """A list such as `layers` names each value once: a repeat is refused rather than dropped, as it is most
    likely a typo for another value (`[3, 3]` for `[3, 13]`) that de-duplicating would hide."""
    twice = sorted({v for v in values if list(values).count(v) > 1})
    if twice:
        raise ConfigError(f"{name}: {', '.join(map(str, twice))} given more than once in {list(values)}; list each "
                          f"once")


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config from a dict such as `to_dict` wrote; unknown keys are an error."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**{key: checked(key, value, hints[key]) for key, value in data.items()})


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_tuple(tp):
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(elem, str(elem))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def checked(key: str, value: Any, tp: Any) -> Any:
    """`value` as field `key` of type `tp` holds it (ints become floats, lists tuples), or a one-line
    ConfigError naming the key and the expected type (params files are YAML: `tokens: lots` is a string)."""
    inner, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if _is_tuple(inner):
        (elem,) = {a for a in typing.get_args(inner) if a is not Ellipsis}
        if isinstance(value, (list, tuple)) and all(_fits(v, elem) for v in value):
            return tuple(float(v) if elem is float else v for v in value)
        example = f" such as [{value}]" if _fits(value, elem) else ""
    elif _fits(value, inner):
        return float(value) if inner is float else value
    else:
        example = ""
    raise ConfigError(f"{key}: expected {_type_name(inner)}{' or null' if optional else ''}{example}, got "
                      f"{value!r} ({type(value).__name__}); fix the value of `{key}`")


def _fits(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def parse_assignment(cls: type, text: str) -> tuple[str, Any]:
    """Parse `key=value` for a field of `cls`, converting the value to the field's type."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    hints = _hints(cls)
    if not sep or key not in hints:
        raise ConfigError(f"--set {text!r}: expected key=value with key one of {sorted(hints)}")
    inner, optional = _unwrap_optional(hints[key])
    raw = raw.strip()
    if optional and raw.lower() in ("none", "null", ""):
        return key, None
    try:
        if _is_tuple(inner):
            (elem,) = {a for a in typing.get_args(inner) if a is not Ellipsis}
            return key, tuple(elem(x) for x in raw.replace(",", " ").split())
        if inner is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return key, raw.lower() in ("true", "1", "yes")
        if typing.get_origin(inner) is Literal:
            return key, raw
        return key, inner(raw)
    except ValueError:
        raise ConfigError(f"--set {text!r}: {raw!r} is not a valid {inner}") from None


def _click_type(tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        return click.Choice([str(a) for a in typing.get_args(tp)])
    return tp


def click_options(cls: type, *, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """A decorator adding one `--field-name` option per config field (default: not given)."""
    hints = _hints(cls)
    docs = field_docs(cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):  # type: ignore[arg-type]
            if f.name in skip:
                continue
            inner, _ = _unwrap_optional(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{docs.get(f.name, '')} [default: {shown if shown not in ('', None) else '-'}]"
            flag = "--" + f.name.replace("_", "-")
            if inner is bool:
                fn = click.option(
                    f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text
                )(fn)
            elif _is_tuple(inner):
                (elem,) = {a for a in typing.get_args(inner) if a is not Ellipsis}
                fn = click.option(
                    flag, f.name, type=elem, multiple=True, help=help_text + f" (several values: {flag} 1 2 3)"
                )(fn)
            else:
                fn = click.option(flag, f.name, type=_click_type(inner), default=None, help=help_text)(fn)
        return fn

    return decorate


def load_params(path: str | Path, section: str) -> dict[str, Any]:
    """One section of a params file (DVC's params.yaml): the values a pipeline stage runs with."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read params file {path}: {err}; pass a readable YAML file") from None
    for key in section.split("."):
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"params file {path} has no section {section!r}; add it or pass another --params")
        data = data[key]
    if not isinstance(data, dict):
        raise ConfigError(f"section {section!r} of {path} must be a mapping of config keys to values")
    return dict(data)


def given(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields the user actually passed on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {k: v for k, v in options.items() if k in names and v is not None and v != ()}


def with_overrides(cfg: C, overrides: Mapping[str, Any]) -> C:
    """A new config: `cfg` with `overrides` applied (validated again by `__post_init__`)."""
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]
