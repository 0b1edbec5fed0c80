"""Damaged chunks, found on any read (`checked_read`, what every store reader goes through) or by reading
every chunk of a store (`verify`, behind `harvest info --verify` and `harvest repair`).

A chunk is damaged when its crc32c does not match, when it cannot be decoded (truncated or garbled), or, for
`verify` only, when its file is missing (zarr would read the fill value without complaint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from csae.shared.errors import UserError

#: Chunks read together by `verify` before looking at them one by one.
_VERIFY_BLOCK = 64


@dataclass(frozen=True)
class Damage:
    array: str
    chunk: int
    start: int
    """First row (entry) of the chunk."""
    stop: int
    reason: str

    def describe(self) -> str:
        return f"chunk {self.chunk} of {self.array} (rows {self.start:,}-{self.stop - 1:,}) {self.reason}"


class DamagedStore(UserError):
    def __init__(self, location: str | Path, damage: Damage) -> None:
        self.damage = damage
        super().__init__(f"store {location} is damaged: {damage.describe()}; repair it with `harvest repair "
                         f"{location}` (it recomputes the damaged rows), then run this command again")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "checksum" in text.lower():
        return "fails its checksum"
    return f"cannot be decoded ({type(err).__name__}: {text[:120]})"


def _damage(arr: zarr.Array, name: str, chunk: int, reason: str) -> Damage:
    rows = arr.chunks[0]
    return Damage(name, chunk, chunk * rows, min((chunk + 1) * rows, arr.shape[0]), reason)


def _first_bad_chunk(arr: zarr.Array, name: str, start: int, stop: int) -> list[Damage]:
    """Read the chunks overlapping [start, stop) one at a time; the ones that fail."""
    rows = arr.chunks[0]
    found = []
    for c in range(start // rows, -(-stop // rows)):
        try:
            arr[c * rows:(c + 1) * rows]
        except Exception as err:  # whatever the codec raises: checksum (ValueError), blosc/zstd (RuntimeError)
            found.append(_damage(arr, name, c, _reason(err)))
    return found


def checked_read(arr: zarr.Array, name: str, start: int, stop: int, location: str | Path) -> np.ndarray:
    """arr[start:stop]; a damaged chunk raises `DamagedStore` naming the array, chunk, rows and fix."""
    try:
        return np.asarray(arr[start:stop])
    except Exception:
        found = _first_bad_chunk(arr, name, start, stop)
        if found:
            raise DamagedStore(location, found[0]) from None
        return np.asarray(arr[start:stop])  # it read on the second try (a transient error)


def verify(group: zarr.Group, arrays: list[str], n_rows: int, progress: Any = None) -> list[Damage]:
    """Every damaged or missing chunk of `arrays` within their first `n_rows` entries (docs: all entries).
    `progress(n)` is called with the entries read, for a progress bar."""
    found: list[Damage] = []
    for name in arrays:
        arr = group[name]
        limit = n_rows if name.split("/")[0] != "docs" else arr.shape[0]
        found += _missing(arr, name, limit)
        step = arr.chunks[0] * _VERIFY_BLOCK
        for start in range(0, limit, step):
            stop = min(start + step, limit)
            try:
                arr[start:stop]
            except Exception:
                found += _first_bad_chunk(arr, name, start, stop)
            if progress is not None:
                progress(stop - start)
    return sorted(set(found), key=lambda d: (d.array, d.chunk))


def _missing(arr: zarr.Array, name: str, limit: int) -> list[Damage]:
    """Chunks (or shards) below `limit` whose file does not exist."""
    outer = (arr.shards or arr.chunks)[0]
    prefix = arr.store_path.path + "/"
    have = set(sync(_keys(arr.store_path.store, prefix)))
    per, n_chunks = outer // arr.chunks[0], -(-limit // arr.chunks[0])
    out = []
    for i in range(-(-limit // outer)):
        coords = (i,) + (0,) * (len(arr.shape) - 1)
        if arr.metadata.encode_chunk_key(coords) not in have:
            out += [_damage(arr, name, c, "is missing") for c in range(i * per, min((i + 1) * per, n_chunks))]
    return out


async def _keys(store: Any, prefix: str) -> list[str]:
    return [key[len(prefix):] async for key in store.list_prefix(prefix)]
