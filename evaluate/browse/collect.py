"""One streaming pass of an SAE's encoder over chosen store rows: what the browser's pages show.

Rows are read in blocks (plus `window` rows either side, so a context's neighbours are encoded with it).
Per block, each feature's block-local top-k is merged into its running top-k (k = top_contexts), and the
same merge with uniform random keys on firing tokens keeps a uniform sample of its firing contexts
(priority sampling: the k largest of i.i.d. uniform keys are a uniform sample without replacement). Kept
contexts carry the feature's activations on their window. RAM: features x kept contexts x window, plus one
block of activations; never rows x features.

Row indices below are *local*: positions in the concatenation of the chosen row ranges (`Rows`).
Shape suffixes: F features, K kept contexts, W window width (2 window + 1), N rows, T topics, B bins.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from csae.shared.config.browse import BrowseConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.store.schema import ActivationStore

#: Histogram edges span this range, in units of the layer's mean residual norm (log-spaced); activations
#: outside it are counted in the first or last bin.
HIST_RANGE = (1e-4, 4.0)


@dataclass
class Rows:
    """The store rows an encoder pass reads: `ranges` of global rows, concatenated, with each row's token id,
    sequence and document."""

    ranges: list[tuple[int, int]]
    token_N: np.ndarray
    seq_N: np.ndarray
    doc_N: np.ndarray

    @property
    def n(self) -> int:
        return len(self.token_N)

    def global_rows(self, local: np.ndarray) -> np.ndarray:
        starts = np.cumsum([0] + [b - a for a, b in self.ranges])
        which = np.searchsorted(starts, local, side="right") - 1
        return np.asarray([a for a, _ in self.ranges])[which] + (local - starts[which])


def sequence_cut(store: ActivationStore, row: int, low: int) -> int:
    """The start of the sequence holding `row` (so [low, cut) holds whole sequences), or `row` itself when no
    sequence starts in the 4096 rows before it."""
    if row >= store.n_rows:
        return store.n_rows
    start = max(low, row - 4096)
    seq = store.read_tokens("seq", start, row + 1)
    changes = np.flatnonzero(seq[1:] != seq[:-1])
    return start + int(changes[-1]) + 1 if len(changes) else row


def choose_rows(store: ActivationStore, heldout_start: int, cap: int) -> Rows:
    """The held-out tail first, then training rows from the store's start, `cap` rows at most (0: all), cut at
    sequence starts."""
    n = store.n_rows
    if not cap or cap >= n:
        ranges = [(heldout_start, n), (0, heldout_start)]
    else:
        tail_end = sequence_cut(store, heldout_start + cap, heldout_start)
        rest = cap - (tail_end - heldout_start)
        ranges = [(heldout_start, tail_end), (0, sequence_cut(store, rest, 0) if rest > 0 else 0)]
    ranges = [(a, b) for a, b in ranges if b > a]
    fields = {name: np.concatenate([store.read_tokens(name, a, b) for a, b in ranges] or [np.zeros(0, np.int32)])
              for name in ("token_id", "seq", "doc")}
    return Rows(ranges, fields["token_id"], fields["seq"], fields["doc"])


def read_rows(store: ActivationStore, layer: int, rows: Rows, start: int, stop: int) -> torch.Tensor:
    """Local rows [start, stop) of a layer (bfloat16)."""
    parts, offset = [], 0
    for a, b in rows.ranges:
        lo, hi = max(start, offset), min(stop, offset + b - a)
        if hi > lo:
            parts.append(store.read(layer, a + lo - offset, a + hi - offset))
        offset += b - a
    return torch.cat(parts)


@dataclass
class Collected:
    """What one encoder pass keeps, per feature. Empty slots (a feature that fired less often) hold row -1."""

    top_val_FK: torch.Tensor
    top_row_FK: torch.Tensor
    top_win_FKW: torch.Tensor
    """The feature's activation on each token of the context's window (centre: index `window`)."""
    sample_val_FK: torch.Tensor
    sample_row_FK: torch.Tensor
    sample_win_FKW: torch.Tensor
    fires_F: torch.Tensor
    """Rows it fires on (activation > 0)."""
    topic_fires_FT: torch.Tensor
    """Rows it fires on, by the topic of the row's document."""
    hist_FB: torch.Tensor
    """Counts of its positive activations in log-spaced bins with edges `edges`."""
    edges: np.ndarray
    n_rows: int


@dataclass
class _Kept:
    """A running per-feature top-k by some key, with each entry's value, row and window."""

    key_FK: torch.Tensor
    val_FK: torch.Tensor
    row_FK: torch.Tensor
    win_FKW: torch.Tensor

    @classmethod
    def empty(cls, f: int, width: int) -> _Kept:
        return cls(torch.full((f, 0), -1.0), torch.zeros(f, 0), torch.zeros(f, 0, dtype=torch.long),
                   torch.zeros(f, 0, width))

    def merge(self, other: _Kept, k: int) -> _Kept:
        keys = torch.cat([self.key_FK, other.key_FK], dim=1)
        idx = keys.topk(min(k, keys.shape[1]), dim=1).indices
        win = torch.cat([self.win_FKW, other.win_FKW], dim=1)
        return _Kept(keys.gather(1, idx), torch.cat([self.val_FK, other.val_FK], dim=1).gather(1, idx),
                     torch.cat([self.row_FK, other.row_FK], dim=1).gather(1, idx),
                     win.gather(1, idx.unsqueeze(2).expand(-1, -1, win.shape[2])))

    def valid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, rows, windows) with rows of non-firing or missing entries set to -1."""
        row = torch.where(self.key_FK >= 0, self.row_FK, -1)
        return self.val_FK, row, self.win_FKW


def windows(f_FL: torch.Tensor, centre_FK: torch.Tensor, window: int) -> torch.Tensor:
    """f_FL[f, centre + o] for o in [-window, window] (0 outside the block), shape (F, K, 2 window + 1)."""
    offsets = torch.arange(-window, window + 1)
    idx = centre_FK.unsqueeze(2) + offsets
    inside = (idx >= 0) & (idx < f_FL.shape[1])
    got = f_FL.gather(1, idx.clamp(0, f_FL.shape[1] - 1).flatten(1)).view(idx.shape)
    return torch.where(inside, got, 0.0)


def encode_features_first(sae: SAE, x_BD: torch.Tensor) -> torch.Tensor:
    """sae.encode(x).T, computed in that layout: (features, rows), each feature's activations contiguous."""
    return torch.relu(torch.addmm(sae.b_enc.unsqueeze(1), sae.W_enc.T, (x_BD - sae.b_dec).T))


def _top_candidates(f_FL: torch.Tensor, core: slice, first_row: int, k: int, window: int) -> _Kept:
    """The block's own k largest activations per feature (a zero one is not a context: key -1)."""
    act = f_FL[:, core]
    top = act.topk(min(k, act.shape[1]), dim=1)
    return _Kept(torch.where(top.values > 0, top.values, -1.0), top.values, top.indices + first_row,
                 windows(f_FL, top.indices + core.start, window))


def _sample_candidates(f_FL: torch.Tensor, core: slice, first_row: int, k: int, window: int, feat: torch.Tensor,
                       pos: torch.Tensor, gen: torch.Generator) -> _Kept:
    """Per feature, its k firing entries of the block with the largest i.i.d. uniform keys (priority sampling)."""
    f = f_FL.shape[0]
    key = torch.rand(len(feat), generator=gen, dtype=torch.float64)
    order = torch.argsort(feat.double() + key)  # by feature, then key (key < 1)
    counts = torch.bincount(feat, minlength=f)
    j = torch.arange(k)
    sel = order[(counts.cumsum(0).unsqueeze(1) - 1 - j).clamp_min(0)]  # largest keys first
    valid = j < counts.unsqueeze(1)
    centre = pos[sel]
    return _Kept(torch.where(valid, key[sel].float(), -1.0), f_FL[:, core].gather(1, centre), centre + first_row,
                 windows(f_FL, centre + core.start, window))


@torch.inference_mode()
def collect(store: ActivationStore, layer: int, sae: SAE, rows: Rows, topic_D: np.ndarray | None, n_topics: int,
            cfg: BrowseConfig, dtype: torch.dtype, device: torch.device, progress: object = None) -> Collected:
    """One pass of `sae`'s encoder over `rows` of `layer` (see the module docstring). Per block, one dense top-k;
    counts, histogram and sample work on the firing entries only."""
    f, w, n_bins, n_t = sae.d_sae, cfg.window, cfg.histogram_bins, max(n_topics, 1)
    enc = copy.deepcopy(sae).to(device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    top, sample = _Kept.empty(f, 2 * w + 1), _Kept.empty(f, 2 * w + 1)
    fires, topic_fires, hist = (torch.zeros(f * m, dtype=torch.long) for m in (1, n_t, n_bins))
    scale = store.mean_norm(layer)
    edges = np.geomspace(HIST_RANGE[0] * scale, HIST_RANGE[1] * scale, n_bins + 1)
    log_lo, log_step = np.log(edges[0]), np.log(edges[1] / edges[0])
    row_topic = (torch.from_numpy(topic_D[rows.doc_N].astype(np.int64)) if topic_D is not None
                 else torch.full((rows.n,), -1, dtype=torch.long))
    for start in range(0, rows.n, cfg.batch_size):
        stop = min(start + cfg.batch_size, rows.n)
        lo, hi = max(0, start - w), min(rows.n, stop + w)
        x = read_rows(store, layer, rows, lo, hi).to(device, dtype)
        f_FL = encode_features_first(enc, x).float().cpu()
        core = slice(start - lo, stop - lo)
        feat, pos = (f_FL[:, core] > 0).nonzero(as_tuple=True)
        fires += torch.bincount(feat, minlength=f)
        t = row_topic[start:stop][pos]
        topic_fires += torch.bincount(feat[t >= 0] * n_t + t[t >= 0], minlength=f * n_t)
        bins = ((f_FL[:, core][feat, pos].log() - log_lo) / log_step).floor().clamp(0, n_bins - 1).long()
        hist += torch.bincount(feat * n_bins + bins, minlength=f * n_bins)
        top = top.merge(_top_candidates(f_FL, core, start, cfg.top_contexts, w), cfg.top_contexts)
        if len(feat) and cfg.sample_contexts:
            sample = sample.merge(_sample_candidates(f_FL, core, start, cfg.sample_contexts, w, feat, pos, gen),
                                  cfg.sample_contexts)
        if progress is not None:
            progress.update(stop - start)  # type: ignore[attr-defined]
    tv, tr, tw = top.valid()
    sv, sr, sw = sample.valid()
    return Collected(tv, tr, tw, sv, sr, sw, fires, topic_fires.view(f, n_t), hist.view(f, n_bins), edges, rows.n)
