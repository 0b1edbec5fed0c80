"""Minibatches of one layer's activations: whole random chunks, shuffled in memory, prefetched.

Reading whole Zarr chunks is ~100x faster than per-row indexing, so the loader reads groups of random
chunks (a "buffer"), shuffles their rows in memory and cuts them into batches, while a background thread
reads the next buffer. When the layer's training part fits under a size threshold it is read once and
kept, and each epoch shuffles all of it.

Every batch is made of context pairs, whatever the loss: rows [0, B/2) are anchors, rows [B/2, B) their
positives (another row of the same sequence). So the CSAE and its plain-SAE baseline read the same rows
in the same order (the contrastive weights do not change the data stream), and every row of a buffer is
read at least once: a buffer's rows are paired up within their sequences, the odd row out of a sequence
with a random other row of it (read twice), and the last batch is filled up with pairs from the start.

With `adjacent` (T-SAE's positives) each batch gets P more rows, [B, B + P): anchor i's neighbour in its
sequence, the token before it (t-1), or after it when the anchor is the sequence's first row here, or the
anchor itself when it is its sequence's only row in the buffer (a sequence of one token, or, when streaming,
one cut to one row by a chunk edge). They are read for the contrastive term only; rows [0, B) are the batch
every other run reads, so all runs still see the same batches (docs/training.md, one data stream).

Everything is a pure function of (seed, rank, buffer number): which chunks form a buffer, the row order
and the pairs; how many batches a buffer gives depends only on its sequence ids, which are read up front.
So a run resumed at step k gets exactly the batches an uninterrupted run gets from step k on, without
reading the skipped buffers. Ranks get disjoint chunks of each epoch.

Rows at or after `train_rows` (the held-out tail) are never read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from csae.shared.store.schema import ActivationStore


class NonFiniteActivations(Exception):
    """Raised (through the batch iterator) when a chunk holds NaN or inf."""


@dataclass(frozen=True)
class Buffer:
    number: int
    epoch: int
    chunks: tuple[int, ...]
    n_batches: int


@dataclass
class _Ready:
    buffer: Buffer
    acts_ND: torch.Tensor  # bfloat16, rows of the buffer's chunks in chunk order
    batches_KB: np.ndarray  # (n_batches, local batch) row indices into acts_ND


class ChunkLoader:
    """Iterate float32 batches (local_batch, d_model) of `scale * activations`, made of context pairs:
    rows [0, B/2) are anchors and rows [B/2, B) their positives, another token of the same sequence; with
    `adjacent`, (local_batch + B/2, d_model): then rows [B, B + B/2) are the anchors' neighbours."""

    def __init__(self, store: ActivationStore, layer: int, *, batch_size: int, train_rows: int, scale: float,
                 seed: int, shuffle_rows: int, in_memory_max_bytes: int, rank: int = 0, world: int = 1,
                 start_step: int = 0, device: str | torch.device = "cpu", adjacent: bool = False) -> None:
        if batch_size % (2 * world):
            raise ValueError(f"batch_size {batch_size} does not split into pairs on each of the {world} ranks")
        self.store, self.layer, self.scale, self.seed = store, layer, scale, seed
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.local_batch = batch_size // world
        self.train_rows = train_rows
        self.chunk_rows = store.chunk_rows
        self.n_chunks = -(-train_rows // self.chunk_rows)
        row_bytes = store.d_model * 2
        self.in_memory = train_rows * row_bytes <= in_memory_max_bytes
        # a buffer must hold at least one batch, or an epoch could yield nothing
        min_chunks = -(-self.local_batch // self.chunk_rows) + 1
        self.buffer_chunks = self.n_chunks if self.in_memory else max(min_chunks, shuffle_rows // self.chunk_rows)
        # sequence ids of every training row (4 bytes a row): they plan the pairs without reading activations
        self.seq_N = store.tokens("seq")[:train_rows]
        # positions too when neighbours are wanted (adjacency is checked, not assumed from the row order)
        self.pos_N = store.tokens("pos")[:train_rows] if adjacent else None
        self._cache: torch.Tensor | None = None
        self._cache_lock = threading.Lock()  # the pool (training thread) and the producer both read the cache
        self.start_step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- the plan: which chunks form buffer n (no data read) -----
    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_rows, self.train_rows - c * self.chunk_rows)

    def _rows(self, chunks: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([np.arange(c * self.chunk_rows, c * self.chunk_rows + self._chunk_len(c))
                               for c in chunks])

    def buffers(self) -> Iterator[Buffer]:
        number, epoch = 0, 0
        half = self.local_batch // 2
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            mine = perm[self.rank::self.world]
            if len(mine) == 0:
                raise ValueError(f"the {self.train_rows} training rows ({self.n_chunks} chunks) leave rank "
                                 f"{self.rank} of {self.world} nothing to read")
            for i in range(0, len(mine), self.buffer_chunks):
                chunks = tuple(int(c) for c in mine[i:i + self.buffer_chunks])
                yield Buffer(number, epoch, chunks, -(-n_pairs(self.seq_N[self._rows(chunks)]) // half))
                number += 1
            epoch += 1

    # ----- reading -----
    def _read_chunk(self, c: int) -> torch.Tensor:
        start, stop = c * self.chunk_rows, c * self.chunk_rows + self._chunk_len(c)
        if self.in_memory:
            return self._cached()[start:stop]
        acts = self.store.read(self.layer, start, stop)  # a damaged chunk: one line naming it (DamagedStore)
        self._check(acts, start)
        return acts

    def _cached(self) -> torch.Tensor:
        with self._cache_lock:
            if self._cache is None:
                cache = self.store.read(self.layer, 0, self.train_rows)
                self._check(cache, 0)
                self._cache = cache
            return self._cache

    def _check(self, acts_ND: torch.Tensor, first_row: int) -> None:
        bad = ~torch.isfinite(acts_ND).all(dim=1)
        if bad.any():
            row = first_row + int(bad.nonzero()[0, 0])
            raise NonFiniteActivations(f"non-finite activations (NaN or inf) at row {row} of the store")

    def _random_chunks(self, n: int, key: int) -> torch.Tensor:
        """At least n rows (bfloat16) of whole random chunks, the same on every rank for the same key."""
        perm = np.random.default_rng([self.seed, 1 << 20, key]).permutation(self.n_chunks)
        parts, got = [], 0
        for c in perm:
            parts.append(self._read_chunk(int(c)))
            got += len(parts[-1])
            if got >= n:
                break
        return torch.cat(parts)

    def sample(self, n: int) -> torch.Tensor:
        """About n scaled rows from random chunks, the same on every rank (for initialising b_dec)."""
        return self._random_chunks(n, 0)[:n].float().mul_(self.scale).to(self.device)

    def pool(self, n: int, key: int) -> torch.Tensor:
        """min(n, train_rows) distinct scaled training rows, the same on every rank for the same key (the
        resampling pool): uniform over the training part when it is in memory, else whole random chunks."""
        if self.in_memory:
            rows = np.random.default_rng([self.seed, 1 << 21, key]).permutation(self.train_rows)[:n]
            x_ND = self._cached()[torch.from_numpy(np.sort(rows))]
        else:
            x_ND = self._random_chunks(n, key + 1)[:n]
        return x_ND.float().mul_(self.scale).to(self.device)

    def _prepare(self, buf: Buffer) -> _Ready:
        rows_N = self._rows(buf.chunks)
        ready = self._pair_up(buf, self.seq_N[rows_N])
        if self.in_memory:  # index the cached layer directly instead of copying the buffer out of it
            ready.acts_ND, ready.batches_KB = self._cached(), rows_N[ready.batches_KB]
            if self.pos_N is not None:  # any row of the layer is at hand: the neighbours by store index
                anchors = ready.batches_KB[:, : self.local_batch // 2]
                ready.batches_KB = np.concatenate([ready.batches_KB, adjacent_rows(anchors, self.seq_N, self.pos_N)],
                                                  axis=1)
            return ready
        if self.pos_N is not None:
            ready.batches_KB = self._with_neighbours(ready.batches_KB, rows_N)
        parts = [self._read_chunk(c) for c in buf.chunks]
        ready.acts_ND = torch.cat(parts) if len(parts) > 1 else parts[0]
        return ready

    def _pair_up(self, buf: Buffer, seq_N: np.ndarray) -> _Ready:
        """The buffer's batches: its rows paired within sequences, pairs in random order, the last batch
        filled up with the first pairs (row indices into the buffer)."""
        rng = np.random.default_rng([self.seed, 7919, self.rank, buf.number])
        anchor_P, positive_P = context_pairs(seq_N, rng)
        half = self.local_batch // 2
        order = np.resize(rng.permutation(len(anchor_P)), buf.n_batches * half).reshape(buf.n_batches, half)
        return _Ready(buf, torch.empty(0), np.concatenate([anchor_P[order], positive_P[order]], axis=1))

    def _with_neighbours(self, batches_KB: np.ndarray, rows_N: np.ndarray) -> np.ndarray:
        """Streaming: the batches (buffer-local row indices) with each anchor's neighbour appended
        (`adjacent_rows`) among the buffer's rows, which are all that is read. No random draw: rows [0, B)
        stay every run's batch."""
        order = np.argsort(rows_N, kind="stable")
        present = rows_N[order]
        anchors = rows_N[batches_KB[:, : self.local_batch // 2]]
        partners = adjacent_rows(anchors, self.seq_N, self.pos_N, present)
        return np.concatenate([batches_KB, order[np.searchsorted(present, partners)]], axis=1)

    # ----- the background thread and the iterator -----
    def _producer(self) -> None:
        # A second OpenMP pool in this thread would fight the training thread's for the same cores
        # (measured: 10x slower steps on 2 cores); this thread's work is memory-bound anyway.
        torch.set_num_threads(1)
        try:
            skip = self.start_step
            for buf in self.buffers():
                if skip >= buf.n_batches:  # resuming: whole buffers before start_step are never read
                    skip -= buf.n_batches
                    continue
                ready = self._prepare(buf)
                while not self._stop.is_set():
                    try:
                        self._queue.put((ready, skip), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                skip = 0
                if self._stop.is_set():
                    return
        except BaseException as err:  # hand it to the consumer, which raises it in the training thread
            self._queue.put((err, 0))

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._thread = threading.Thread(target=self._producer, daemon=True, name=f"loader-layer{self.layer}")
        self._thread.start()
        while True:
            ready, skip = self._queue.get()
            if isinstance(ready, BaseException):
                raise ready
            for j in range(skip, ready.buffer.n_batches):
                # index_select: 0.08 ms for 512 rows of 640, where advanced indexing takes 0.27
                rows = ready.acts_ND.index_select(0, torch.from_numpy(ready.batches_KB[j]))
                yield rows.to(self.device, torch.float32).mul_(self.scale)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)


def _groups(seq_N: np.ndarray, order_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows listed in `order_N`, grouped by sequence (seq_N[order_N] sorted): each position's group
    start and group length."""
    s = seq_N[order_N]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    lengths = np.diff(np.r_[starts, len(s)])
    return np.repeat(starts, lengths), np.repeat(lengths, lengths)


def n_pairs(seq_N: np.ndarray) -> int:
    """How many pairs `context_pairs` makes of these rows: ceil(n / 2) per sequence of n rows."""
    counts = np.unique(seq_N, return_counts=True)[1]
    return int(((counts + 1) // 2).sum())


def context_pairs(seq_N: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(anchor rows, positive rows) that use every row: the rows of each sequence, in random order, paired
    up two by two; an odd row out is paired with a random other row of its sequence, and a sequence's
    only row with itself (rare: a sequence cut by a chunk edge). ceil(n / 2) pairs per sequence."""
    perm = rng.permutation(len(seq_N))
    order = perm[np.argsort(seq_N[perm], kind="stable")]  # grouped by sequence, random within a group
    start, length = _groups(seq_N, order)
    pos = np.arange(len(order)) - start  # position within the group
    first = pos % 2 == 0  # each pair starts at an even position
    partner = np.where(pos + 1 < length, pos + 1, rng.integers(0, np.maximum(length - 1, 1)))
    partner = np.where(length > 1, partner, 0)
    return order[first], order[(start + partner)[first]]


def adjacent_rows(anchor_A: np.ndarray, seq_N: np.ndarray, pos_N: np.ndarray,
                  present_S: np.ndarray | None = None) -> np.ndarray:
    """For each anchor row (store index), the row of the token before it in its sequence (position - 1), else
    the one after it (the anchor is its sequence's first row here), else the anchor itself (its sequence's only
    row). Rows must be present (`present_S`, sorted; None: every row of seq_N) and of the same sequence at the
    next position: never a row of another sequence or document."""
    out = anchor_A.copy()
    for step in (1, -1):  # the token after first, so that the one before (t-1) wins where both exist
        cand = anchor_A + step
        ok = (cand >= 0) & (cand < len(seq_N))
        c = np.where(ok, cand, anchor_A)
        ok &= (seq_N[c] == seq_N[anchor_A]) & (pos_N[c] == pos_N[anchor_A] + step)
        if present_S is not None:
            i = np.minimum(np.searchsorted(present_S, c), len(present_S) - 1)
            ok &= present_S[i] == c
        out = np.where(ok, cand, out)
    return out
