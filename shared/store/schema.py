"""The activation store's layout, in one place. Code and tests both go through this module.

A store is a Zarr v3 group:

    <store>/                      attributes: see `create` and `finish_`
      resid_post/<L>              (rows, d_model) residual stream after block L, bfloat16 (see below)
      tokens/token_id             (rows,) int32   token id at that position
      tokens/seq                  (rows,) int32   sequence index (one sequence = BOS + up to context-1 tokens
                                                  of one document)
      tokens/pos                  (rows,) int32   position in the sequence (BOS is position 0, never stored)
      tokens/doc                  (rows,) int32   document index into docs/*
      docs/source_index           (docs,) int64   the document's index in its corpus
      docs/topic                  (docs,) int16   index into the `topics` attribute (-1: no topic)
      docs/title                  (docs,) str
      progress/<first chunk>-<id> which chunks are on disk, per writer (csae.shared.store.records)

bfloat16: zarr-python 3.1 has no built-in bfloat16, so activation chunks hold the raw bfloat16 bits
as uint16 and the array carries `logical_dtype: bfloat16`. Those are the same little-endian bytes the
v3 `bfloat16` extension type writes, so a reader gets a zero-copy `view(torch.bfloat16)`, and moving
to the extension type later is a metadata-only change. Chunks are compressed with blosc lz4 +
bitshuffle (typesize 2): about 17% smaller than raw at the same read speed (zstd halved it).
`shard_chunks` > 1 packs that many chunks into one file (Zarr v3 sharding), for stores of many
millions of rows (see docs/scaling.md).

Checksums: every chunk of every array ends with a crc32c (the v3 `crc32c` codec), checked by zarr on
each read. A chunk that fails it, or cannot be decoded, stops any reader with one line naming the
array, the chunk's rows and the fix (`DamagedStore`); `verify` checks every chunk.

Row order is the harvest order; readers take whole chunks and shuffle in memory (per-row random
indexing is ~100x slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs

from csae.shared.config.base import ConfigError, from_dict, to_dict
from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError
from csae.shared.store.locations import (  # noqa: F401 - where a store lives is part of the store's API
    display_name,
    exists,
    fs_of,
    is_url,
    open_group,
    remove,
    replace,
    sibling,
)
from csae.shared.store.records import PROGRESS, chunk_sums, mean_norms, rows_done
from csae.shared.store.verify import checked_read

#: The store format's version; a store of another version is refused with the command that rebuilds it.
SCHEMA_VERSION = 2
ACTS = "resid_post"
TOKEN_FIELDS = ("token_id", "seq", "pos", "doc")
LOGICAL_DTYPE = "bfloat16"


def acts_name(layer: int) -> str:
    return f"{ACTS}/{layer}"


def _codecs(bf16: bool) -> list[Any]:
    """Compression, then a crc32c of the compressed bytes, so any damage to a chunk file is caught on read."""
    first = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2) if bf16
             else zarr.codecs.ZstdCodec(level=0))
    return [first, zarr.codecs.Crc32cCodec()]


def bf16_to_bits(x: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> uint16 numpy array of the same bits (copy only if not on CPU/contiguous)."""
    return x.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def bits_to_bf16(bits: np.ndarray) -> torch.Tensor:
    """uint16 numpy array of bfloat16 bits -> bfloat16 tensor sharing its memory."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def create(path: str | Path, *, layers: Sequence[int], d_model: int, capacity: int, chunk_rows: int,
           attrs: dict[str, Any], shard_chunks: int = 1) -> zarr.Group:
    """A new, empty, incomplete store of `capacity` rows. The attributes go in with the group's first
    write, so a store whose creation was interrupted is still recognisably an unfinished csae store."""
    group = open_group(path, mode="w", attributes={
        **attrs, "schema_version": SCHEMA_VERSION, "layers": [int(x) for x in layers], "d_model": int(d_model),
        "dtype": LOGICAL_DTYPE, "chunk_rows": int(chunk_rows), "shard_chunks": int(shard_chunks),
        "checksums": "crc32c", "complete": False})
    rows = chunk_rows * shard_chunks if shard_chunks > 1 else None
    for layer in layers:
        group.create_array(acts_name(layer), shape=(capacity, d_model), chunks=(chunk_rows, d_model),
                           shards=(rows, d_model) if rows else None, dtype="uint16", compressors=_codecs(True),
                           fill_value=0, attributes={"logical_dtype": LOGICAL_DTYPE, "layer": int(layer),
                                                     "hook": f"blocks.{layer}.hook_resid_post"})
    for name in TOKEN_FIELDS:
        group.create_array(f"tokens/{name}", shape=(capacity,), chunks=(chunk_rows,), shards=(rows,) if rows else None,
                           dtype="int32", compressors=_codecs(False), fill_value=-1)
    group.create_group(PROGRESS)
    return group


def row_arrays(group: zarr.Group) -> list[str]:
    """The arrays with one entry per row (activations of each layer, then token fields)."""
    return [acts_name(x) for x in group.attrs["layers"]] + [f"tokens/{n}" for n in TOKEN_FIELDS]


def ensure_rows_(group: zarr.Group, rows: int) -> None:
    """Make every row array hold at least `rows` rows (a metadata write; call from one process only)."""
    for name in row_arrays(group):
        arr = group[name]
        if arr.shape[0] < rows:
            arr.resize((rows, *arr.shape[1:]))


def write_rows_(group: zarr.Group, start: int, acts: dict[int, torch.Tensor], tokens: dict[str, np.ndarray]) -> None:
    """Write rows [start, start + n) of every layer and token field (whole chunks: see harvest.write)."""
    n = len(tokens["token_id"])
    for layer, x in acts.items():
        group[acts_name(layer)][start:start + n] = bf16_to_bits(x)
    for name in TOKEN_FIELDS:
        group[f"tokens/{name}"][start:start + n] = tokens[name].astype(np.int32)


def write_docs_(group: zarr.Group, source_index: Sequence[int], topic: Sequence[int], title: Sequence[str]) -> None:
    n = len(source_index)
    for name, values, dtype in (("source_index", source_index, "int64"), ("topic", topic, "int16")):
        arr = group.create_array(f"docs/{name}", shape=(n,), chunks=(max(n, 1),), dtype=dtype, overwrite=True,
                                 compressors=_codecs(False))
        arr[:] = np.asarray(values, dtype=dtype)
    titles = group.create_array("docs/title", shape=(n,), chunks=(max(n, 1),), dtype=str, overwrite=True,
                                compressors=_codecs(False))
    titles[:] = np.asarray(list(title), dtype=object)


def finish_(group: zarr.Group, n_rows: int, attrs: dict[str, Any] | None = None) -> None:
    """Trim to `n_rows`, record per-layer mean norms, and only then mark the store complete. Norms come from
    the writers' progress records; chunks without one (written by a single `write_rows_`) are read."""
    for name in row_arrays(group):
        arr = group[name]
        if arr.shape[0] != n_rows:
            arr.resize((n_rows, *arr.shape[1:]))
    _, sums = chunk_sums(group, n_rows)
    store = ActivationStore(group)
    for c in np.flatnonzero(~np.isfinite(sums).all(axis=1)):
        start, stop = c * store.chunk_rows, min((c + 1) * store.chunk_rows, n_rows)
        sums[c] = [float(store.read(layer, start, stop).float().norm(dim=1).double().sum()) for layer in store.layers]
    norms = dict(zip(map(str, store.layers), mean_norms(sums, n_rows), strict=True))
    group.attrs.update({**(attrs or {}), "mean_norm": norms, "n_tokens": int(n_rows), "rows_written": int(n_rows),
                        "complete": True})


def is_unfinished(location: str | Path) -> bool:
    """A store whose creation was interrupted before any row was written: csae's attributes and no rows."""
    try:
        group = open_group(location, mode="r")
        attrs = dict(group.attrs)
    except Exception:  # unreadable: not ours to judge
        return False
    return (attrs.get("schema_version") == SCHEMA_VERSION and not attrs.get("complete")
            and rows_done(group, _capacity(group)) == 0)


def _capacity(group: zarr.Group) -> int:
    names = [n for n in row_arrays(group) if n in group] if "layers" in group.attrs else []
    return int(group[names[0]].shape[0]) if names else 0


class UnfinishedStore(UserError):
    def __init__(self, path: str | Path) -> None:
        super().__init__(f"store {path} is unfinished: its creation was interrupted before any row was written; "
                         f"run the same `harvest run` command again to restart it")


class ActivationStore:
    """Read access to a store. `open` checks it is a complete store of this schema."""

    def __init__(self, group: zarr.Group, location: str | Path | None = None) -> None:
        self.group = group
        self.location = str(location) if location is not None else str(group.store_path)
        self.attrs: dict[str, Any] = dict(group.attrs)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> ActivationStore:
        if not exists(path):
            raise UserError(f"store {path} does not exist; create it with `harvest run --store {path}`")
        if not is_url(path) and Path(path).is_file():
            raise UserError(f"{path} is a file, not an activation store; pass the directory `harvest run --store` "
                            f"wrote")
        try:
            group = open_group(path, mode="r")
            attrs = dict(group.attrs)
        except Exception as err:  # zarr raises several types for missing or unparsable metadata
            raise UserError(f"{path} is not a readable Zarr store ({type(err).__name__}: {err}); pass the store "
                            f"`harvest run` wrote, or move it aside and harvest again") from err
        if attrs.get("schema_version") != SCHEMA_VERSION and is_unfinished(path):
            raise UnfinishedStore(path)
        if isinstance(attrs.get("schema_version"), int) and attrs["schema_version"] < SCHEMA_VERSION:
            raise UserError(f"{path} was written by an older csae (store format {attrs['schema_version']}, this "
                            f"csae reads {SCHEMA_VERSION}); rebuild it with `harvest run --overwrite` and its settings")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path} is not a csae activation store of schema version {SCHEMA_VERSION} "
                            f"(found {attrs.get('schema_version')!r}); pass the store `harvest run` wrote")
        missing = [name for name in row_arrays(group) if name not in group]
        if missing and not attrs.get("complete"):
            raise UnfinishedStore(path)
        store = cls(group, path)
        if require_complete and not attrs.get("complete"):
            raise UserError(f"store {path} is incomplete ({store.rows_done():,} of {store.target_rows:,} rows "
                            f"written); finish it by re-running the same `harvest run` command")
        if missing:
            raise UserError(f"store {path} is damaged: arrays {missing} are missing; move it aside and harvest "
                            f"again with the same `harvest run` command")
        return store

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.attrs["layers"]]

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_tokens"] if self.attrs.get("complete") else self.rows_done())

    @property
    def target_rows(self) -> int:
        """Rows the store is being filled to (its arrays' length until it is complete)."""
        return self.n_rows if self.attrs.get("complete") else _capacity(self.group)

    def rows_done(self) -> int:
        return rows_done(self.group, _capacity(self.group)) if not self.attrs.get("complete") else self.n_rows

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def harvest_config(self) -> HarvestConfig:
        """The HarvestConfig the store was made with (recorded in its `config` attribute)."""
        try:
            return from_dict(HarvestConfig, self.attrs.get("config") or {})
        except (ConfigError, TypeError) as err:
            raise UserError(f"the store's recorded harvest settings do not fit this csae version ({err}); "
                            f"re-create it with `harvest run --overwrite`") from None

    @property
    def topics(self) -> list[str]:
        return list(self.attrs.get("topics", []))

    def acts(self, layer: int) -> zarr.Array:
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not in the store (it has layers {self.layers}); pass one of "
                            f"those or harvest it")
        return self.group[acts_name(layer)]

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) of one array; a damaged chunk stops with `DamagedStore` naming it."""
        return checked_read(self.group[name], name, start, stop, self.location)

    def read(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a layer as a bfloat16 tensor (batch, d_model)."""
        self.acts(layer)
        return bits_to_bf16(self.read_array(acts_name(layer), start, stop))

    def read_tokens(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.read_array(f"tokens/{name}", start, stop)

    def tokens(self, name: str) -> np.ndarray:
        return self.read_tokens(name, 0, self.n_rows)

    def docs(self, name: str) -> np.ndarray:
        arr = self.group[f"docs/{name}"]
        return self.read_array(f"docs/{name}", 0, arr.shape[0])

    def heldout_start(self, fraction: float) -> int:
        """First row of the held-out tail, which training never reads.

        The tail is the last `fraction` of rows, starting at a chunk boundary moved forward to the next
        sequence start, so no sequence is split between the parts. Equal to n_rows when the store is
        too small to hold out anything.
        """
        n = self.n_rows
        boundary = n - round(n * fraction / self.chunk_rows) * self.chunk_rows
        if fraction <= 0 or boundary >= n or boundary <= 0:
            return n
        prev = int(self.read_tokens("seq", boundary - 1, boundary)[0])
        window = self.read_tokens("seq", boundary, min(n, boundary + 4 * self.chunk_rows))
        later = np.flatnonzero(window != prev)
        return boundary + int(later[0]) if len(later) else n

    def mean_norm(self, layer: int) -> float:
        return float(self.attrs["mean_norm"][str(layer)])

    def size_bytes(self) -> int:
        """Bytes on disk (or in the object store), -1 when the store cannot say."""
        store = self.group.store_path.store
        if hasattr(store, "root"):  # a local store
            return sum(p.stat().st_size for p in Path(str(store.root)).rglob("*") if p.is_file())
        try:
            return int(store.fs.du(store.path, total=True))  # an fsspec store
        except Exception:  # some filesystems cannot sum sizes
            return -1


def make_test_store(path: str | Path, *, layers: Sequence[int] = (0, 1), d_model: int = 32, n_docs: int = 64,
                    seq_len: int = 32, n_atoms: int = 48, active: int = 4, topics: Sequence[str] = ("a", "b"),
                    chunk_rows: int = 256, scale: float = 10.0, seed: int = 0) -> tuple[ActivationStore, torch.Tensor]:
    """A small complete store with planted sparse structure, written through the real writers.

    Each token's activation is a sum of `active` of `n_atoms` random unit directions with exponential
    magnitudes, plus 1% noise, times `scale`. Atoms [0, len(topics)) are topic atoms: atom t fires on
    every token of documents of topic t and never elsewhere. Every layer gets the same structure with
    its own atoms. Returns the opened store and the atoms, shape (layers, n_atoms, d_model).
    """
    gen = torch.Generator().manual_seed(seed)
    n_rows = n_docs * seq_len
    doc_topic = torch.arange(n_docs) % len(topics)
    doc = torch.arange(n_rows) // seq_len
    atoms = torch.nn.functional.normalize(torch.randn(len(layers), n_atoms, d_model, generator=gen), dim=-1)
    group = create(path, layers=layers, d_model=d_model, capacity=n_rows, chunk_rows=chunk_rows,
                   attrs={"model": {"name": "planted"}, "corpus": {"name": "planted"}, "split": "train",
                          "context": seq_len + 1, "topics": list(topics),
                          "config": to_dict(HarvestConfig(model="planted", dataset="planted", layers=tuple(layers),
                                                          tokens=n_rows, context=seq_len + 1,
                                                          chunk_rows=chunk_rows))})
    acts = {}
    for i, layer in enumerate(layers):
        idx = torch.randint(len(topics), n_atoms, (n_rows, active), generator=gen)
        mags = -torch.log(torch.rand(n_rows, active, generator=gen))
        x = torch.einsum("na,nad->nd", mags, atoms[i][idx])
        x += atoms[i][doc_topic[doc]] * (1.0 + torch.rand(n_rows, 1, generator=gen))
        x += 0.01 * torch.randn(n_rows, d_model, generator=gen)
        acts[layer] = (scale * x).to(torch.bfloat16)
    tokens = {"token_id": torch.randint(3, 1000, (n_rows,), generator=gen).numpy(), "seq": doc.numpy(),
              "pos": (torch.arange(n_rows) % seq_len + 1).numpy(), "doc": doc.numpy()}
    write_rows_(group, 0, acts, tokens)
    write_docs_(group, list(range(n_docs)), doc_topic.tolist(), [f"doc {i}" for i in range(n_docs)])
    finish_(group, n_rows)
    return ActivationStore.open(path), atoms
