"""The activation store's layout, in one place. Code and tests both go through this module.

A store is a Zarr v3 group:

    <store>/                      attributes: see `Meta` fields below
      resid_post/<L>              (rows, d_model) residual stream after block L, bfloat16 (see below)
      tokens/token_id             (rows,) int32   token id at that position
      tokens/seq                  (rows,) int32   sequence index (one sequence = BOS + up to context-1 tokens
                                                  of one document)
      tokens/pos                  (rows,) int32   position in the sequence (BOS is position 0, never stored)
      tokens/doc                  (rows,) int32   document index into docs/*
      docs/source_index           (docs,) int64   the document's index in its corpus
      docs/topic                  (docs,) int16   index into the `topics` attribute (-1: no topic)
      docs/title                  (docs,) str

bfloat16: zarr-python 3.1 has no built-in bfloat16, so activation chunks hold the raw bfloat16 bits
as uint16 and the array carries `logical_dtype: bfloat16`. Those are the same little-endian bytes the
v3 `bfloat16` extension type writes, so a reader gets a zero-copy `view(torch.bfloat16)`, and moving
to the extension type later is a metadata-only change. Chunks are compressed with blosc lz4 +
bitshuffle (typesize 2): about 17% smaller than raw at the same read speed (zstd halved it); no
sharding, which made zarr-python reads 4-7x slower.

Row order is the harvest order; readers take whole chunks and shuffle in memory (per-row random
indexing is ~100x slower).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
import zarr.codecs

from csae.shared.config.base import ConfigError, from_dict, to_dict
from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError

SCHEMA_VERSION = 1
ACTS = "resid_post"
TOKEN_FIELDS = ("token_id", "seq", "pos", "doc")
LOGICAL_DTYPE = "bfloat16"


# ----- where a store lives: a local path or an fsspec URL (s3://, gs://, file://, memory://), passed through -----

def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def _fs(location: str | Path) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(str(location))


def open_group(location: str | Path, mode: Literal["r", "r+", "w"]) -> zarr.Group:
    """The store's root group; a local path or any URL zarr's fsspec store takes, unchanged."""
    # fsspec's local filesystem does not create parent directories unless asked to (file:// URLs)
    options = {"auto_mkdir": True} if str(location).startswith("file://") else None
    return zarr.open_group(str(location), mode=mode, zarr_format=3 if mode == "w" else None,
                           storage_options=options)


def exists(location: str | Path) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = _fs(location)
    return bool(fs.exists(path))


def remove(location: str | Path) -> None:
    """Delete a whole store (callers check first that it is one)."""
    if not is_url(location):
        shutil.rmtree(location)
        return
    fs, path = _fs(location)
    fs.rm(path, recursive=True)


def display_name(location: str | Path) -> str:
    """The store's last path component, for progress bars."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def acts_name(layer: int) -> str:
    return f"{ACTS}/{layer}"


def _bf16_codecs() -> list[Any]:
    return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2)]


def bf16_to_bits(x: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> uint16 numpy array of the same bits (copy only if not on CPU/contiguous)."""
    return x.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def bits_to_bf16(bits: np.ndarray) -> torch.Tensor:
    """uint16 numpy array of bfloat16 bits -> bfloat16 tensor sharing its memory."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def create(path: str | Path, *, layers: Sequence[int], d_model: int, capacity: int, chunk_rows: int,
           attrs: dict[str, Any]) -> zarr.Group:
    """A new, empty, incomplete store with room for `capacity` rows (grown as needed, trimmed when finished)."""
    group = open_group(path, mode="w")
    for layer in layers:
        arr = group.create_array(acts_name(layer), shape=(capacity, d_model), chunks=(chunk_rows, d_model),
                                 dtype="uint16", compressors=_bf16_codecs(), fill_value=0)
        arr.attrs.update({"logical_dtype": LOGICAL_DTYPE, "layer": int(layer),
                          "hook": f"blocks.{layer}.hook_resid_post"})
    for name in TOKEN_FIELDS:
        group.create_array(f"tokens/{name}", shape=(capacity,), chunks=(chunk_rows,), dtype="int32",
                           fill_value=-1)
    group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "layers": [int(x) for x in layers],
                        "d_model": int(d_model), "dtype": LOGICAL_DTYPE, "chunk_rows": int(chunk_rows),
                        "rows_written": 0, "complete": False})
    return group


def write_rows_(group: zarr.Group, start: int, acts: dict[int, torch.Tensor], tokens: dict[str, np.ndarray]) -> None:
    """Write rows [start, start + n) of every layer and token field (chunk-aligned for resumability)."""
    n = len(tokens["token_id"])
    _grow_(group, start + n)
    for layer, x in acts.items():
        group[acts_name(layer)][start:start + n] = bf16_to_bits(x)
    for name in TOKEN_FIELDS:
        group[f"tokens/{name}"][start:start + n] = tokens[name].astype(np.int32)


def _grow_(group: zarr.Group, rows: int) -> None:
    """Make room for `rows` rows, doubling: growing is a metadata write, while shrinking a large
    over-allocation at the end would visit every chunk key beyond the data."""
    arrays = [group[acts_name(x)] for x in group.attrs["layers"]] + [group[f"tokens/{n}"] for n in TOKEN_FIELDS]
    for arr in arrays:
        if arr.shape[0] < rows:
            arr.resize((max(rows, 2 * arr.shape[0]), *arr.shape[1:]))


def write_docs_(group: zarr.Group, source_index: Sequence[int], topic: Sequence[int], title: Sequence[str]) -> None:
    n = len(source_index)
    for name, values, dtype in (("source_index", source_index, "int64"), ("topic", topic, "int16")):
        arr = group.create_array(f"docs/{name}", shape=(n,), chunks=(max(n, 1),), dtype=dtype, overwrite=True)
        arr[:] = np.asarray(values, dtype=dtype)
    titles = group.create_array("docs/title", shape=(n,), chunks=(max(n, 1),), dtype=str, overwrite=True)
    titles[:] = np.asarray(list(title), dtype=object)


def finish_(group: zarr.Group, n_rows: int) -> None:
    """Trim to `n_rows`, record per-layer mean norms, and only then mark the store complete."""
    for layer in group.attrs["layers"]:
        group[acts_name(layer)].resize((n_rows, group.attrs["d_model"]))
    for name in TOKEN_FIELDS:
        group[f"tokens/{name}"].resize((n_rows,))
    store = ActivationStore(group)
    norms = {str(layer): store.mean_norm_from_data(layer, n_rows) for layer in store.layers}
    group.attrs.update({"mean_norm": norms, "n_tokens": int(n_rows), "rows_written": int(n_rows),
                        "complete": True})


class ActivationStore:
    """Read access to a store. `open` checks it is a complete store of this schema."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> ActivationStore:
        if not exists(path):
            raise UserError(f"store {path} does not exist; create it with `harvest run --store {path}`")
        try:
            group = open_group(path, mode="r")
            attrs = dict(group.attrs)
        except Exception as err:  # zarr raises several types for missing or unparsable metadata
            raise UserError(f"{path} is not a readable Zarr store ({type(err).__name__}: {err}); "
                            f"re-create it with `harvest run --store {path} --overwrite`") from err
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path} is not a csae activation store of schema version {SCHEMA_VERSION} "
                            f"(found {attrs.get('schema_version')!r}); re-create it with `harvest run`")
        store = cls(group)
        if require_complete and not attrs.get("complete"):
            raise UserError(f"store {path} is incomplete ({attrs.get('rows_written', 0)} rows written); finish "
                            f"it by re-running the same `harvest run` command")
        missing = [acts_name(x) for x in store.layers if acts_name(x) not in group]
        if missing:
            raise UserError(f"store {path} is corrupt: arrays {missing} are missing; re-create it with "
                            f"`harvest run --overwrite`")
        return store

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.attrs["layers"]]

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_tokens"] if self.attrs.get("complete") else self.attrs["rows_written"])

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

    def read(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a layer as a bfloat16 tensor (batch, d_model)."""
        return bits_to_bf16(self.acts(layer)[start:stop])

    def tokens(self, name: str) -> np.ndarray:
        return np.asarray(self.group[f"tokens/{name}"][: self.n_rows])

    def docs(self, name: str) -> np.ndarray:
        return np.asarray(self.group[f"docs/{name}"][:])

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
        seq = self.group["tokens/seq"]
        prev = int(seq[boundary - 1])
        window = np.asarray(seq[boundary: min(n, boundary + 4 * self.chunk_rows)])
        later = np.flatnonzero(window != prev)
        return boundary + int(later[0]) if len(later) else n

    def mean_norm(self, layer: int) -> float:
        return float(self.attrs["mean_norm"][str(layer)])

    def mean_norm_from_data(self, layer: int, n_rows: int) -> float:
        total, step = 0.0, self.chunk_rows * 16
        for start in range(0, n_rows, step):
            x = self.read(layer, start, min(start + step, n_rows)).float()
            total += float(x.norm(dim=1).double().sum())
        return total / max(n_rows, 1)

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
