"""Which chunks of a store are on disk, with their rows' norm sums: the progress records of harvest's writers.
Part of the store layout (csae.shared.store.schema).

Each writer (one rank of one `harvest run`) owns one record per range of chunks it was given:

    progress/<first chunk>-<id>  (chunks, layers) float64, NaN until written; attributes first_chunk, stop_row
                             (the row after the range's last), rank, world, started

After a chunk's rows of every array are on disk, its writer stores the chunk's sum of row norms per layer in
the record. So a finite row means the chunk is complete, a kill at any point loses at most the chunks in
flight, and each layer's mean norm comes from the sums at the end without reading the store again (summed
with math.fsum, which is exact: the mean does not depend on which rank wrote which chunk). Only a record's
owner writes it, and ranks own disjoint chunks: no two processes ever write one file.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
import zarr.codecs

PROGRESS = "progress"


def new_record(group: zarr.Group, first_chunk: int, n_chunks: int, stop_row: int,
               meta: Mapping[str, Any]) -> zarr.Array:
    """A new record (a name of its own) for chunks [first_chunk, first_chunk + n_chunks), all unwritten."""
    n_layers = len(group.attrs["layers"])
    return group.create_array(f"{PROGRESS}/{first_chunk}-{uuid.uuid4().hex[:8]}", shape=(n_chunks, n_layers),
                              chunks=(min(n_chunks, 1024), n_layers), dtype="float64", fill_value=np.nan,
                              compressors=[zarr.codecs.ZstdCodec(level=0), zarr.codecs.Crc32cCodec()],
                              attributes={"first_chunk": first_chunk, "stop_row": stop_row, **meta})


def record_(record: zarr.Array, first_chunk: int, sums_CL: np.ndarray) -> None:
    """Mark chunks [first_chunk, first_chunk + len(sums_CL)) complete, with their per-layer norm sums."""
    start = first_chunk - int(record.attrs["first_chunk"])
    record[start:start + len(sums_CL)] = sums_CL


def chunk_sums(group: zarr.Group, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(done_C, sums_CL) for a store of `n_rows` rows: whether each chunk holds all of its rows below n_rows,
    and its per-layer norm sums (NaN where unknown)."""
    chunk_rows = int(group.attrs["chunk_rows"])
    n_chunks = -(-n_rows // chunk_rows)
    done = np.zeros(n_chunks, dtype=bool)
    sums = np.full((n_chunks, len(group.attrs["layers"])), np.nan)
    if PROGRESS not in group:
        return done, sums
    for _, record in group[PROGRESS].arrays():
        first, stop = int(record.attrs["first_chunk"]), int(record.attrs["stop_row"])
        values = np.asarray(record[:])
        for i in np.flatnonzero(np.isfinite(values).all(axis=1)):
            c = first + int(i)
            # a chunk is complete for this store if the writer covered all of its rows below n_rows
            if c < n_chunks and min((c + 1) * chunk_rows, stop) >= min((c + 1) * chunk_rows, n_rows):
                done[c], sums[c] = True, values[i]
    return done, sums


def rows_done(group: zarr.Group, n_rows: int) -> int:
    """Rows of complete chunks of a store of `n_rows` rows."""
    chunk_rows = int(group.attrs["chunk_rows"])
    done, _ = chunk_sums(group, n_rows)
    return sum(min(chunk_rows, n_rows - c * chunk_rows) for c in np.flatnonzero(done))


def mean_norms(sums_CL: np.ndarray, n_rows: int) -> list[float]:
    """Each layer's mean row norm from the per-chunk sums (exact summation: order does not matter)."""
    return [math.fsum(sums_CL[:, i].tolist()) / max(n_rows, 1) for i in range(sums_CL.shape[1])]
