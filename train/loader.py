"""Minibatches of one layer's activations: whole random chunks, shuffled in memory, prefetched.

Reading whole Zarr chunks is ~100x faster than per-row indexing, so the loader reads groups of random
chunks (a "buffer"), shuffles their rows in memory and cuts them into batches, while a background thread
reads the next buffer. When the layer's training part fits under a size threshold it is read once and
kept, and each epoch shuffles all of it.

Everything is a pure function of (seed, rank, buffer number): which chunks form a buffer, the row order
and the positive partners. So a run resumed at step k gets exactly the batches an uninterrupted run gets
from step k on, without reading the skipped buffers. Ranks get disjoint chunks of each epoch.

Rows at or after `train_rows` (the held-out tail) are never read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from csae.shared.schema import ActivationStore


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
    """Iterate float32 batches (local_batch, d_model) of `scale * activations`.

    With `pairs`, rows [0, B/2) of a batch are anchors and rows [B/2, B) their positives: another token
    of the same sequence (same `seq`), chosen at random among that sequence's rows in the buffer.
    """

    def __init__(self, store: ActivationStore, layer: int, *, batch_size: int, train_rows: int, scale: float,
                 seed: int, pairs: bool, shuffle_rows: int, in_memory_max_bytes: int, rank: int = 0,
                 world: int = 1, start_step: int = 0, device: str | torch.device = "cpu") -> None:
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world} ranks")
        self.store, self.layer, self.scale, self.seed = store, layer, scale, seed
        self.rank, self.world, self.pairs, self.device = rank, world, pairs, torch.device(device)
        self.local_batch = batch_size // world
        self.train_rows = train_rows
        self.chunk_rows = store.chunk_rows
        self.n_chunks = -(-train_rows // self.chunk_rows)
        row_bytes = store.d_model * 2
        self.in_memory = train_rows * row_bytes <= in_memory_max_bytes
        # a buffer must hold at least one batch, or an epoch could yield nothing
        min_chunks = -(-self.local_batch // self.chunk_rows) + 1
        self.buffer_chunks = self.n_chunks if self.in_memory else max(min_chunks, shuffle_rows // self.chunk_rows)
        self._cache: torch.Tensor | None = None
        self._seq_cache: np.ndarray | None = None
        self.start_step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- the plan: which chunks form buffer n (no data read) -----
    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_rows, self.train_rows - c * self.chunk_rows)

    def buffers(self) -> Iterator[Buffer]:
        number, epoch = 0, 0
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            mine = perm[self.rank::self.world]
            batches = 0
            for i in range(0, len(mine), self.buffer_chunks):
                chunks = tuple(int(c) for c in mine[i:i + self.buffer_chunks])
                rows = sum(self._chunk_len(c) for c in chunks)
                batches += rows // self.local_batch
                yield Buffer(number, epoch, chunks, rows // self.local_batch)
                number += 1
            if batches == 0:
                raise ValueError(f"rank {self.rank}'s share of {self.train_rows} training rows holds no batch "
                                 f"of {self.local_batch}")
            epoch += 1

    # ----- reading -----
    def _read_chunk(self, c: int) -> tuple[torch.Tensor, np.ndarray]:
        start, stop = c * self.chunk_rows, c * self.chunk_rows + self._chunk_len(c)
        if self.in_memory:
            if self._cache is None:
                self._cache = self.store.read(self.layer, 0, self.train_rows)
                self._seq_cache = self.store.read_tokens("seq", 0, self.train_rows)
                self._check(self._cache, 0)
            return self._cache[start:stop], self._seq_cache[start:stop]  # type: ignore[index]
        acts = self.store.read(self.layer, start, stop)  # a damaged chunk: one line naming it (DamagedStore)
        self._check(acts, start)
        return acts, self.store.read_tokens("seq", start, stop)

    def _check(self, acts_ND: torch.Tensor, first_row: int) -> None:
        bad = ~torch.isfinite(acts_ND).all(dim=1)
        if bad.any():
            row = first_row + int(bad.nonzero()[0, 0])
            raise NonFiniteActivations(f"non-finite activations (NaN or inf) at row {row} of the store")

    def sample(self, n: int) -> torch.Tensor:
        """About n scaled rows from random chunks, the same on every rank (for initialising b_dec)."""
        perm = np.random.default_rng([self.seed, 1 << 20]).permutation(self.n_chunks)
        parts, got = [], 0
        for c in perm:
            acts, _ = self._read_chunk(int(c))
            parts.append(acts)
            got += len(acts)
            if got >= n:
                break
        return torch.cat(parts)[:n].float().mul_(self.scale).to(self.device)

    def _prepare(self, buf: Buffer) -> _Ready:
        if self.in_memory:  # index the cached layer directly instead of copying the buffer out of it
            self._read_chunk(buf.chunks[0])
            rows_N = np.concatenate([np.arange(c * self.chunk_rows, c * self.chunk_rows + self._chunk_len(c))
                                     for c in buf.chunks])
            ready = self._shuffle(buf, self._cache, self._seq_cache[rows_N])  # type: ignore[arg-type,index]
            ready.batches_KB = rows_N[ready.batches_KB]
            return ready
        parts = [self._read_chunk(c) for c in buf.chunks]
        acts_ND = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        return self._shuffle(buf, acts_ND, np.concatenate([p[1] for p in parts]))

    def _shuffle(self, buf: Buffer, acts_ND: torch.Tensor, seq_N: np.ndarray) -> _Ready:
        rng = np.random.default_rng([self.seed, 7919, self.rank, buf.number])
        k, b = buf.n_batches, self.local_batch
        if not self.pairs:
            return _Ready(buf, acts_ND, rng.permutation(len(seq_N))[: k * b].reshape(k, b))
        partner_N, eligible = positive_partners(seq_N, rng)
        if len(eligible) == 0:  # every sequence has a single row here: pair rows with themselves
            eligible, partner_N = np.arange(len(seq_N)), np.arange(len(seq_N))
        need = k * (b // 2)
        anchors = rng.permutation(eligible)
        anchors = np.tile(anchors, -(-need // len(anchors)))[:need].reshape(k, b // 2)
        return _Ready(buf, acts_ND, np.concatenate([anchors, partner_N[anchors]], axis=1))

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
                idx = torch.from_numpy(ready.batches_KB[j])
                yield ready.acts_ND[idx].to(self.device, torch.float32).mul_(self.scale)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)


def positive_partners(seq_N: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each row, another row with the same sequence id (uniform among the others), and the rows that
    have one. Rows whose sequence has no other row in the buffer get themselves and are not eligible."""
    order = np.argsort(seq_N, kind="stable")
    s = seq_N[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    lengths = np.diff(np.r_[starts, len(s)])
    group = np.repeat(np.arange(len(starts)), lengths)
    n = lengths[group]
    start = starts[group]
    offset = rng.integers(1, np.maximum(n, 2))  # uniform over the n - 1 other rows
    partner_sorted = np.where(n > 1, start + (np.arange(len(s)) - start + offset) % n, np.arange(len(s)))
    partner_N = np.empty_like(order)
    partner_N[order] = order[partner_sorted]
    return partner_N, np.sort(order[n > 1])
