"""Where a store lives: a local path or an fsspec URL (s3://, gs://, file://, memory://), passed through
unchanged to zarr; and the few operations on a whole store that depend on which."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import zarr

from csae.shared.files import replace_dir


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def fs_of(location: str | Path) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(str(location))


def open_group(location: str | Path, mode: Literal["r", "r+", "w"],
               attributes: dict[str, Any] | None = None) -> zarr.Group:
    """The store's root group; a local path or any URL zarr's fsspec store takes, unchanged."""
    # fsspec's local filesystem does not create parent directories unless asked to (file:// URLs)
    options = {"auto_mkdir": True} if str(location).startswith("file://") else None
    return zarr.open_group(str(location), mode=mode, zarr_format=3 if mode == "w" else None,
                           storage_options=options, attributes=attributes)


def exists(location: str | Path) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = fs_of(location)
    return bool(fs.exists(path))


def remove(location: str | Path) -> None:
    """Delete a whole store (callers check first that it is one)."""
    if not is_url(location):
        shutil.rmtree(location)
        return
    fs, path = fs_of(location)
    fs.rm(path, recursive=True)


def replace(new: str, target: str) -> None:
    """Put the finished store `new` where `target` is. Local: the two names are exchanged atomically where
    Linux can (readers see the old store or the new one, never neither); URLs: remove, then move (object
    stores cannot rename, so readers may briefly find nothing)."""
    if not is_url(target) or str(target).startswith("file://"):
        replace_dir(Path(str(new).removeprefix("file://")), Path(str(target).removeprefix("file://")))
        return
    fs, src = fs_of(new)
    _, dst = fs_of(target)
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    fs.mv(src, dst, recursive=True)


def display_name(location: str | Path) -> str:
    """The store's last path component, for progress bars."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def sibling(location: str | Path, suffix: str) -> str:
    """A hidden location beside the store: `<parent>/.<name><suffix>` (where --overwrite builds a replacement)."""
    text = str(location).rstrip("/")
    parent, _, name = text.rpartition("/")
    return f"{parent}/.{name}{suffix}" if parent or text.startswith("/") else f".{name}{suffix}"
