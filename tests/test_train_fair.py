"""A fair CSAE-vs-baseline training: resampling from a pool without replacement, one data stream for every
run, the SAE and the head clipped separately (each test fails under the behaviour it rules out)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csae.shared.config.train import TrainConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.store.schema import ActivationStore, make_test_store
from csae.train.loader import Buffer, ChunkLoader, context_pairs, n_pairs
from csae.train.resample import choose_directions, resample_
from csae.train.run import fit, resolve
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sequences of 40 rows in chunks of 256: sequences straddle chunk edges (odd and single-row parts)."""
    path = tmp_path_factory.mktemp("store") / "acts.zarr"
    make_test_store(path, layers=(0,), d_model=32, n_docs=72, seq_len=40, chunk_rows=256)
    return path


def _off_diagonal_max_cos(w_FD: torch.Tensor) -> float:
    u = F.normalize(w_FD.double(), dim=1)
    cos = u @ u.T
    cos.fill_diagonal_(-1.0)
    return float(cos.max())


# ----- resampling -----

def test_500_dead_features_from_a_65536_row_pool_get_500_distinct_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    sae = SAE(16, 1024)
    sae.reset_parameters_(gen)
    pool = torch.randn(65_536, 16, generator=gen)
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[torch.randperm(1024, generator=gen)[:500]] = True
    # only 1,000 rows are badly reconstructed, so with replacement many draws would repeat
    err = torch.zeros(65_536)
    bad = torch.randperm(65_536, generator=gen)[:1000]
    err[bad] = 1.0
    dirs = choose_directions(pool, err, sae.b_dec.detach(), 500, torch.Generator().manual_seed(1))
    resample_(sae, lambda p: {}, dirs, dead, scale=0.2, distributed=False)
    w = sae.W_dec.detach()[dead]
    assert len(torch.unique(w, dim=0)) == 500 and _off_diagonal_max_cos(w) < 0.99
    # each is the direction of a distinct badly reconstructed row
    match = (F.normalize(pool - sae.b_dec.detach(), dim=1) @ w.T).max(dim=0)
    assert (match.values > 1 - 1e-5).all() and len(set(match.indices.tolist())) == 500
    assert set(match.indices.tolist()) <= set(bad.tolist())


def test_draws_follow_the_squared_error() -> None:
    """Rows with 9x the error are drawn ~9x as often (500 of 10,000 candidates: without-replacement
    inclusion is then within a few percent of proportional)."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(65_536, 8, generator=gen)
    err = torch.zeros(65_536)
    rows = torch.randperm(65_536, generator=gen)[:10_000]
    err[rows[:5000]], err[rows[5000:]] = 1.0, 9.0
    dirs = choose_directions(pool, err, torch.zeros(8), 500, torch.Generator().manual_seed(2))
    picked = (dirs @ F.normalize(pool, dim=1).T).argmax(dim=1)
    share_heavy = float(torch.isin(picked, rows[5000:]).float().mean())
    assert 0.85 < share_heavy < 0.95  # expected 0.9; sd of the share ~0.013


def test_more_dead_features_than_distinct_rows_warns_and_keeps_them_apart(caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(100, 32, generator=gen)
    pool = distinct.repeat(40, 1)  # 4,000 rows, 100 distinct
    with caplog.at_level(logging.WARNING, logger="csae.train.resample"):
        dirs = choose_directions(pool, torch.ones(4000), torch.zeros(32), 300, torch.Generator().manual_seed(0))
    assert "only 100 distinct candidate rows" in caplog.text
    assert len(torch.unique(dirs, dim=0)) == 300 and _off_diagonal_max_cos(dirs) < 0.999
    # the first 100 are the 100 distinct rows, exactly
    assert (dirs[:100] @ F.normalize(distinct, dim=1).T).max(dim=1).values.min() > 1 - 1e-6


def test_baseline_on_a_planted_store_with_many_dead_features_has_no_duplicates(tmp_path: Path) -> None:
    """A 16x dictionary (1,024 features) for 128 planted atoms: features die and are resampled, more than
    a hundred in a window. Drawn with replacement from one batch (the old recipe), revived twins stay
    bit-identical in a plain SAE: measured 243 pairs with cosine > 0.99 here, 0 now (max 0.92). The
    store's rows themselves have no pair above 0.99."""
    path = tmp_path / "acts.zarr"
    make_test_store(path, layers=(0,), d_model=64, n_docs=128, seq_len=32, chunk_rows=256, n_atoms=128, active=6)
    cfg = resolve(TrainConfig(expansion=16, batch_size=128, tokens=128 * 160, lr=1e-2, warmup_steps=10, l1=1.0,
                              l1_warmup_steps=0, alpha=0.0, beta=0.0, resample_every=20, resample_until=0.9, seeds=(0,),
                              dtype="float32"))
    resampled: list[int] = []
    fit(cfg, path, tmp_path / "ck", layers=[0], progress=False,
        on_resample=lambda step, trainer: resampled.append(len(trainer.resampled_S)))
    assert max(resampled) >= 100  # many features were resampled at once
    sae = SAE.load(tmp_path / "ck" / "seed_0" / "layer_0")
    assert _off_diagonal_max_cos(sae.W_dec.detach()) < 0.99


# ----- one data stream -----

def _row_index(store: ActivationStore, x_BD: torch.Tensor, lookup: dict[bytes, int]) -> list[int]:
    return [lookup[row.to(torch.bfloat16).view(torch.int16).numpy().tobytes()] for row in x_BD]


def _lookup(store: ActivationStore, layer: int = 0) -> dict[bytes, int]:
    x = store.read(layer, 0, store.n_rows)
    table = {row.view(torch.int16).numpy().tobytes(): i for i, row in enumerate(x)}
    assert len(table) == store.n_rows  # rows are distinct, so a row identifies its index
    return table


def test_csae_tsae_and_baseline_read_the_same_rows_at_every_step(store_path: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's three runs (params.yaml `runs`), BatchTopK as there: the same batch at every step. The
    T-SAE's adjacent positives come on top of it (its last P rows, each anchor's neighbour), read for its
    contrastive term only."""
    store = ActivationStore.open(store_path)
    lookup = _lookup(store)
    scale = np.sqrt(store.d_model) / store.mean_norm(0)  # what train fit multiplies rows by
    seen: list[list[int]] = []
    original = CSAETrainer.step

    def recording_step(self: CSAETrainer, x_BD: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        seen.append(_row_index(store, x_BD / scale, lookup))
        return original(self, x_BD, step)

    monkeypatch.setattr(CSAETrainer, "step", recording_step)
    runs = {}
    tsae = {"alpha": 0.1, "beta": 0.0, "positives": "adjacent", "matryoshka_high": 0.2, "contrast_on": "high_level"}
    for name, weights in (("baseline", {"alpha": 0.0, "beta": 0.0}), ("csae", {"alpha": 2.0, "beta": 10.0}),
                          ("tsae", tsae)):
        seen.clear()
        cfg = resolve(TrainConfig(expansion=2, batch_size=64, tokens=64 * 60, warmup_steps=2, seeds=(3,),  # type: ignore[arg-type]
                                  architecture="batchtopk", k=4, in_memory_max_mb=0, shuffle_rows=512, **weights))
        fit(cfg, store_path, tmp_path / name, layers=[0], progress=False)
        runs[name] = [list(rows) for rows in seen]
    assert len(runs["csae"]) == 60 and runs["csae"] == runs["baseline"]
    assert [rows[:64] for rows in runs["tsae"]] == runs["baseline"] and all(len(r) == 96 for r in runs["tsae"])
    seq, pos = store.tokens("seq"), store.tokens("pos")
    for rows in runs["baseline"]:  # the baseline's batches are context pairs too
        assert (seq[rows[:32]] == seq[rows[32:]]).all()
    for rows in runs["tsae"]:  # the T-SAE's extra rows: each anchor's neighbour in its sequence
        anchors, partners = np.array(rows[:32]), np.array(rows[64:])
        assert (seq[anchors] == seq[partners]).all() and (np.abs(pos[anchors] - pos[partners]) <= 1).all()


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_every_training_row_is_read_within_one_epoch(store_path: Path, in_memory: bool, world: int) -> None:
    store = ActivationStore.open(store_path)
    lookup = _lookup(store)
    train_rows = store.heldout_start(0.1)
    seq = store.tokens("seq")
    read: list[int] = []
    for rank in range(world):
        loader = ChunkLoader(store, 0, batch_size=64, train_rows=train_rows, scale=1.0, seed=11, shuffle_rows=512,
                             in_memory_max_bytes=(1 << 30) if in_memory else 0, rank=rank, world=world)
        epoch = _epoch0(loader)
        batches = iter(loader)
        for _ in range(sum(b.n_batches for b in epoch)):
            rows = _row_index(store, next(batches), lookup)
            assert (seq[rows[:32 // world]] == seq[rows[32 // world:]]).all()
            read += rows
        loader.close()
    assert set(read) == set(range(train_rows))
    # at most one extra read per sequence part and per buffer's last batch: the epoch is not padded out
    assert len(read) < train_rows * 1.2


def _epoch0(loader: ChunkLoader) -> list[Buffer]:
    out = []
    for b in loader.buffers():
        if b.epoch > 0:
            return out
        out.append(b)
    return out


def test_context_pairs_use_every_row_within_sequences() -> None:
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(30), rng.integers(1, 12, 30))
    rng.shuffle(seq)
    anchors, positives = context_pairs(seq, np.random.default_rng(1))
    counts = np.bincount(seq)
    assert len(anchors) == n_pairs(seq) == sum((c + 1) // 2 for c in counts)
    assert (seq[anchors] == seq[positives]).all()
    assert set(anchors) | set(positives) == set(range(len(seq)))
    # only a sequence's single row is its own partner
    same = anchors == positives
    assert (counts[seq[anchors[same]]] == 1).all() and same.sum() == (counts == 1).sum()


def test_augment_positives_keep_working(store_path: Path, tmp_path: Path) -> None:
    cfg = resolve(TrainConfig(positives="augment", tokens=64 * 30, batch_size=64, expansion=2, warmup_steps=2,
                              seeds=(0,), dtype="float32"))
    last = fit(cfg, store_path, tmp_path / "aug", layers=[0], progress=False)[0, 0]
    assert 0 < last["info_nce"] < np.log(32) and last["diversity"] > 0


# ----- clipping -----

def test_scaling_the_heads_gradient_does_not_change_the_sae_update() -> None:
    """Clip 0.05 acts on every step of both parts. Under one global norm, 1000x the head's gradient shrinks
    the SAE's step: weights then differ by 4e-3 after one step (measured). Clipped separately, the first
    step is bit-identical; later steps see a head that differs by rounding (the clip divides by
    norm + 1e-6), measured 3e-8 after 4 steps."""
    cfg = TrainConfig(expansion=2, tokens=64 * 10, batch_size=64, grad_clip=0.05, warmup_steps=0, lr=1e-2,
                      head_dim=8, resample_every=0)
    cpu = Runtime(torch.device("cpu"), None)
    plain, scaled = CSAETrainer(cfg, 16, cpu, seed=0), CSAETrainer(cfg, 16, cpu, seed=0)
    for p in scaled.head.parameters():
        p.register_hook(lambda g: g * 1000)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(64, 16, generator=gen) * 4
        m_plain, m_scaled = plain.step(x, step), scaled.step(x, step)
        assert m_plain["grad_norm_sae"] > 0.05 and m_plain["grad_norm_head"] > 0.05  # clipping acts on both
        assert m_scaled["grad_norm_head"] == pytest.approx(1000 * m_plain["grad_norm_head"].item(), rel=1e-4)
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(plain.sae.parameters(), scaled.sae.parameters(), strict=True))
    for a, b in zip(plain.sae.parameters(), scaled.sae.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_near_parallel_rows_and_living_directions_are_drawn_last() -> None:
    """The highest-error rows are 50 near-parallel outliers and 20 rows along a living feature; 100 draws
    take one outlier, none along the living feature, and no two directions within cosine 0.9."""
    gen = torch.Generator().manual_seed(0)
    d = 32
    outlier, living = F.normalize(torch.randn(2, d, generator=gen), dim=1)
    typical = torch.randn(4000, d, generator=gen)
    outliers = 30 * outlier + 0.05 * torch.randn(50, d, generator=gen)
    along = 10 * living + 0.05 * torch.randn(20, d, generator=gen)
    pool = torch.cat([typical, outliers, along])
    err = torch.cat([torch.ones(4000), torch.full((70,), 1000.0)])  # the 70 would take ~all of 100 draws
    dirs = choose_directions(pool, err, torch.zeros(d), 100, torch.Generator().manual_seed(3), living[None])
    assert int(((dirs @ outlier) > 0.99).sum()) == 1
    assert float((dirs @ living).max()) < 0.9
    assert _off_diagonal_max_cos(dirs) <= 0.9
