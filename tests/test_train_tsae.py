"""T-SAE (Bhalla et al. 2025): the Matryoshka prefix term, the temporal InfoNCE on high-level codes, the whole
step against a dense formula written out here, adjacent positives from the loader, the preset, and the saved
checkpoint (SAELens' layout with the high-level block in its metadata). Each test fails under the mistake it
names."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tolerances import TSAE_STEP_TOLERANCE

from csae.shared.config.base import ConfigError
from csae.shared.config.train import PRESETS, TSAE, TSAE_OURS, TrainConfig, preset
from csae.shared.sae.autoencoder import HIGH_LEVEL_KEY, SAE
from csae.shared.store.schema import ActivationStore, make_test_store
from csae.train import losses, sparse
from csae.train.loader import ChunkLoader, adjacent_rows
from csae.train.run import fit, resolve
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer

#: the pipeline's T-SAE overrides (params.yaml runs.tsae), on a small dictionary
TSAE_RUN = {"architecture": "batchtopk", "alpha": 0.5, "beta": 0.0, "positives": "adjacent", "matryoshka_high": 0.2,
            "contrast_on": "high_level"}
K, D, P = 4, 32, 32  # 256 features, a high-level block of 51


def _trainer(dtype: str, mode: str, **over: object) -> CSAETrainer:
    cfg = TrainConfig(**{**TSAE_RUN, "k": K, "expansion": 8, "batch_size": 2 * P, "tokens": 2 * P * 100,  # type: ignore[arg-type]
                         "high_level_weight": 0.4, "warmup_steps": 0, "resample_every": 0, "sparse": mode,
                         "dtype": dtype, "aux_k": 0.0, **over})
    trainer = CSAETrainer(cfg, D, Runtime(torch.device("cpu"), torch.bfloat16 if dtype == "bfloat16" else None), 0)
    with torch.no_grad():
        trainer.sae.b_dec.copy_(torch.linspace(-1, 1, D))
        trainer.sae.b_enc[: trainer.sae.high_level] += 1.0  # high-level features win some of the k x B places
    return trainer


def _x() -> torch.Tensor:
    """A batch of 2P rows and P neighbour rows, as the loader stacks them for adjacent positives."""
    return torch.randn(3 * P, D, generator=torch.Generator().manual_seed(1)) * 3


def _batch_top_k(p: torch.Tensor, k: int) -> torch.Tensor:
    """The kept entries of BatchTopK by sorting: the k x B largest of the batch, among the positive ones."""
    flat = np.argsort(-p.detach().numpy().ravel(), kind="stable")[: k * len(p)]
    keep = np.zeros(p.numel(), dtype=bool)
    keep[flat] = True
    return torch.from_numpy(keep.reshape(p.shape)) & (p > 0)


def test_config_names_its_needs() -> None:
    assert TrainConfig().high_level(2560) == 0 and TrainConfig(matryoshka_high=0.2).high_level(2560) == 512
    with pytest.raises(ConfigError, match="needs a high-level block"):
        TrainConfig(contrast_on="high_level")
    with pytest.raises(ConfigError, match="matryoshka_high"):
        TrainConfig(matryoshka_high=1.0)
    assert not TrainConfig(**TSAE_RUN).trains_head and TrainConfig().trains_head  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["off", "on"])
def test_prefix_term_is_the_high_level_blocks_own_reconstruction(mode: str) -> None:
    """With the low-level block switched off, the prefix term and the whole dictionary's are both the
    reconstruction from the high-level block alone (written out); with it on, only the whole term uses it."""
    trainer = _trainer("float32", mode, alpha=0.0)
    sae, h = trainer.sae, trainer.sae.high_level
    x_all = _x()
    x = x_all[: 2 * P]  # the batch; the neighbour rows after it are not reconstructed
    with torch.no_grad():
        sae.b_enc[h:] = -1e4  # no low-level feature is ever positive, so none is kept
    trainer.model.sparse_now = mode == "on"
    terms, _, _ = trainer.model.training_forward_pass(x_all, 0)
    p = ((x - sae.b_dec) @ sae.W_enc[:, :h] + sae.b_enc[:h]).detach()
    f = torch.where(_batch_top_k(p, K), p, 0.0)  # the k x B largest of the whole batch: all high-level here
    want = ((x - (f @ sae.W_dec[:h].detach() + sae.b_dec.detach())) ** 2).sum(1).mean()
    for name in ("recon_high", "recon_loss"):
        assert float(terms[name].detach()) == pytest.approx(float(want), rel=1e-5), name
    # with the low-level block on: the prefix term still reconstructs from features [0, h) only
    trainer = _trainer("float32", mode, alpha=0.0)
    sae = trainer.sae
    trainer.model.sparse_now = mode == "on"
    terms, _, feats = trainer.model.training_forward_pass(x_all, 0)
    f = feats.dense().detach()
    assert (f[:, h:] > 0).sum() > 0 and (f[:, :h] > 0).sum() > 0
    want_high = ((x - (f[:, :h] @ sae.W_dec[:h].detach() + sae.b_dec.detach())) ** 2).sum(1).mean()
    assert float(terms["recon_high"]) == pytest.approx(float(want_high), rel=1e-5)
    assert abs(float(terms["recon_high"]) - float(terms["recon_loss"])) > 0.05 * float(terms["recon_loss"])


@pytest.mark.parametrize("mode", ["off", "on"])
def test_step_equals_the_dense_formula_written_out(mode: str, dtype: str) -> None:
    """Loss, reconstruction and every SAE gradient of a T-SAE step (Matryoshka + temporal InfoNCE) against the
    formula in float32 autograd: BatchTopK by sorting, the neighbours as their own batch, cosine by
    F.normalize, the symmetric cross entropy."""
    trainer = _trainer(dtype, mode, alpha=50.0)  # InfoNCE's gradient as large as the reconstruction's
    trainer.model.sparse_now = mode == "on"
    x = _x()
    terms, x_hat, feats = trainer.model.training_forward_pass(x, 0)
    terms["loss"].backward()
    got = {"x_hat": x_hat.detach().float(), "loss": terms["loss"].detach()}
    got.update({"grad " + n: p.grad.detach().clone() for n, p in trainer.sae.named_parameters()})
    got_keep = feats.dense().detach() > 0
    got_keep_adj = trainer.model.features(x[2 * P:]).dense().detach() > 0

    sae, h, cfg = _trainer("float32", "off", alpha=50.0).sae, trainer.sae.high_level, trainer.cfg
    W_enc, b_enc, W_dec, b_dec = (t.detach().clone().requires_grad_(True) for t in
                                  (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    codes = []
    for rows, got_mask in ((x[: 2 * P], got_keep), (x[2 * P:], got_keep_adj)):
        p = (rows - b_dec) @ W_enc + b_enc
        keep = _batch_top_k(p, K)
        if dtype == "bfloat16":  # rounding ties or reorders entries near the cut: those, and only those, may differ
            off = got_mask != keep
            cut = p[keep].min()
            assert bool(((p[off] - cut).abs() <= 2**-7 * cut.abs()).all()) and int(got_mask.sum()) == int(keep.sum())
            keep = got_mask
        else:
            assert torch.equal(got_mask, keep)
        codes.append(torch.where(keep, p, torch.zeros_like(p)))
    f, f_adj = codes
    x_b = x[: 2 * P]
    x_hat = f @ W_dec + b_dec
    x_hat_high = f[:, :h] @ W_dec[:h] + b_dec
    recon = ((x_hat - x_b) ** 2).sum(1).mean() + cfg.high_level_weight * ((x_hat_high - x_b) ** 2).sum(1).mean()
    s = F.normalize(f[:P, :h], dim=1) @ F.normalize(f_adj[:, :h], dim=1).T / cfg.temperature
    labels = torch.arange(P)
    nce = (F.cross_entropy(s, labels) + F.cross_entropy(s.T, labels)) / 2
    loss = recon + cfg.alpha * nce
    loss.backward(retain_graph=True)
    want = {"x_hat": x_hat.detach(), "loss": loss.detach(), "grad W_enc": W_enc.grad, "grad b_enc": b_enc.grad,
            "grad W_dec": W_dec.grad, "grad b_dec": b_dec.grad}
    assert float(nce) > 0.5  # the InfoNCE term is in play (not a constant of zero rows)
    assert float((f_adj[:, :h] > 0).any(1).float().mean()) > 0.5
    worst = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want}
    assert max(worst.values()) < TSAE_STEP_TOLERANCE[dtype], worst
    # the contrastive term's gradient is a sizeable part of the encoder's: dropping it would fail above (and
    # the prefix term's, checked below by its own reference)
    W_enc.grad = None
    recon.backward()
    assert float((W_enc.grad - want["grad W_enc"]).abs().max() / want["grad W_enc"].abs().max()) > 0.05


def test_prefix_of_sparse_features_is_the_first_columns_on_either_pattern_path() -> None:
    """SparseFeatures.prefix keeps exactly the entries of columns [0, h), in order, with their gradients; the
    torch pattern (other devices) equals the kernel's (CPU) field by field."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(24, 40, generator=gen)
    feats = sparse.encode(p, torch.eye(40), torch.zeros(40), torch.zeros(40), torch.float32)
    vals = feats.vals_K.detach().requires_grad_(True)
    feats = sparse.SparseFeatures(feats.pat, vals, torch.float32)
    high = feats.prefix(13)
    assert torch.equal(high.dense(), feats.dense()[:, :13]) and high.pat.n_cols == 13
    (high.dense() * torch.arange(13.0)).sum().backward()
    want = torch.where(feats.pat.cols_K < 13, feats.pat.cols_K.float(), 0.0)
    assert torch.equal(vals.grad, want)
    rows, cols = high.pat.rows_K, high.pat.cols_K
    a, b = (sparse.pattern_of_entries(rows, cols, 24, 13, use) for use in (True, False))
    for name in ("cols_K", "row_offsets", "by_col_K", "rows_by_col_K", "col_offsets"):
        assert torch.equal(getattr(a, name).long(), getattr(b, name).long()), name


def test_temporal_info_nce_is_least_for_identical_neighbours_and_orthogonal_others() -> None:
    """Non-negative codes have cosines in [0, 1], so the least InfoNCE has cosine 1 for each (t-1, t) pair and 0
    for every other pair: log(1 + (P - 1) e^{-1/T}) in both directions. Planted, it is reached; anything else
    gives more."""
    T, H = 0.1, 40
    gen = torch.Generator().manual_seed(0)
    codes = torch.zeros(P, H)
    codes[torch.arange(P), torch.arange(P)] = torch.rand(P, generator=gen) + 0.5  # one own feature per pair
    least = math.log(1 + (P - 1) * math.exp(-1 / T))
    planted = float(losses.temporal_info_nce(codes, codes * 3.0, T))  # cosine ignores the scale
    assert planted == pytest.approx(least, abs=1e-6)  # ~1e-3: float32's log-softmax near 0 keeps ~1e-7
    others = {
        "random codes": torch.rand(P, H, generator=gen),
        "pairs swapped": codes[torch.roll(torch.arange(P), 1)],
        "partly shared": codes + 0.3 * codes[torch.roll(torch.arange(P), 1)],
        "noisy neighbour": codes + 0.05 * torch.rand(P, H, generator=gen),
    }
    for name, adjacent in others.items():
        assert float(losses.temporal_info_nce(codes, adjacent, T)) > least + 1e-5, name
    with pytest.raises(ValueError, match="one row each"):
        losses.temporal_info_nce(codes, codes[:-1], T)


def test_adjacent_rows_never_cross_a_sequence() -> None:
    """Two documents back to back, the second of two sequences; rows 5-6 absent (a chunk edge): each anchor's
    partner is the token before it, else after it, else itself."""
    seq = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    pos = np.array([1, 2, 3, 1, 2, 1, 2, 3, 1])
    anchors = np.arange(9)
    assert adjacent_rows(anchors, seq, pos).tolist() == [1, 0, 1, 4, 3, 6, 5, 6, 8]
    present = np.array([0, 1, 2, 3, 4, 7, 8])
    assert adjacent_rows(np.array([7, 3, 0]), seq, pos, present).tolist() == [7, 4, 1]  # 7: its neighbour 6 absent


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sequences of 40 rows in chunks of 256 (sequences straddle chunk edges)."""
    path = tmp_path_factory.mktemp("tsae") / "acts.zarr"
    make_test_store(path, layers=(0,), d_model=32, n_docs=72, seq_len=40, chunk_rows=256)
    return path


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_loader_appends_each_anchors_neighbour(store_path: Path, in_memory: bool, world: int) -> None:
    """Rows [B, B + P) are the anchors' neighbours: same sequence and document, one position apart, the token
    before the anchor wherever the buffer holds it; rows [0, B) are the batches without `adjacent`."""
    store = ActivationStore.open(store_path)
    x_all = store.read(0, 0, store.n_rows).float()
    seq, pos, doc = (store.tokens(n) for n in ("seq", "pos", "doc"))
    train_rows = store.heldout_start(0.1)
    B = 64 // world
    for rank in range(world):
        loaders = [ChunkLoader(store, 0, batch_size=64, train_rows=train_rows, scale=1.0, seed=3, shuffle_rows=512,
                               in_memory_max_bytes=(1 << 30) if in_memory else 0, rank=rank, world=world,
                               adjacent=adjacent) for adjacent in (False, True)]
        plain, adj = (iter(lo) for lo in loaders)
        selves, before = 0, 0
        for _ in range(50):
            a, b = next(plain), next(adj)
            assert b.shape == (B + B // 2, 32) and torch.equal(a, b[:B])
            rows = torch.cdist(b, x_all).argmin(dim=1).numpy()
            anchors, partners = rows[: B // 2], rows[B:]
            assert (partners < train_rows).all()
            assert (seq[anchors] == seq[partners]).all() and (doc[anchors] == doc[partners]).all()
            step = pos[partners] - pos[anchors]
            assert set(np.unique(step)) <= {-1, 0, 1}
            selves += int((step == 0).sum())
            before += int(((step == -1) | (pos[anchors] == 1)).sum())
        for lo in loaders:
            lo.close()
        if in_memory:  # every sequence is whole: no self-pairs, and t-1 wherever the anchor is not first
            assert selves == 0 and before == 50 * B // 2
        else:  # a self-pair only for a single row cut off by a chunk edge (rare)
            assert selves <= 0.05 * 50 * B // 2


def test_tsae_preset_states_every_field_and_says_whose_it_is() -> None:
    """No value of the tsae preset is inherited from our defaults: each is T-SAE's (paper or its authors' code)
    or listed as ours."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TSAE) | set(TSAE_OURS) == fields and not set(TSAE) & set(TSAE_OURS)
    assert set(PRESETS["tsae"]) == fields
    cfg = preset("tsae")
    assert (cfg.architecture, cfg.matryoshka_high, cfg.positives, cfg.contrast_on, cfg.beta) == (
        "batchtopk", 0.2, "adjacent", "high_level", 0.0)
    assert "temperature" in TSAE_OURS


def test_saved_tsae_is_saelens_jumprelu_with_its_block_and_reconstructs_as_raw_weights_say(
        store_path: Path, tmp_path: Path) -> None:
    cfg = resolve(TrainConfig(**{**TSAE_RUN, "expansion": 4, "batch_size": 64, "tokens": 64 * 40, "k": 8,  # type: ignore[arg-type]
                                 "warmup_steps": 2, "seeds": (0,), "dtype": "float32"}))
    last = fit(cfg, store_path, tmp_path, layers=[0], progress=False)[0, 0]
    assert last["recon_high"] > 0 and last["recon_loss"] > 0 and last["info_nce"] > 0
    out = tmp_path / "seed_0" / "layer_0"
    meta = json.loads((out / "cfg.json").read_text())
    tensors = load_file(out / "sae_weights.safetensors")
    assert meta["architecture"] == "jumprelu" and set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert meta["metadata"][HIGH_LEVEL_KEY] == int(0.2 * 128) == SAE.load(out).high_level
    # SAELens' JumpReLU encode and decode, written out from the raw tensors, on raw activations
    x = ActivationStore.open(store_path).read(0, 0, 256).float()
    p = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    f = p * (p > tensors["threshold"])
    x_hat = f @ tensors["W_dec"] + tensors["b_dec"]
    got_x_hat, got_f = SAE.load(out)(x)
    assert torch.allclose(got_f, f, atol=1e-5) and torch.allclose(got_x_hat, x_hat, atol=1e-4)
    assert 0 < float((f > 0).sum(1).float().mean()) < 64
