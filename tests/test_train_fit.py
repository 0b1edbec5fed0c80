"""End-to-end `train fit` on a small planted store: learning, outputs, resume, resampling, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import save_file

from csae.shared.config.train import TrainConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.sae.checkpoint import LayerInfo, load_layer, read_metrics
from csae.shared.sae.head import ContrastiveHead
from csae.shared.store import schema
from csae.shared.store.schema import ActivationStore, make_test_store
from csae.train import losses
from csae.train.cli import main
from csae.train.loader import Buffer, ChunkLoader
from csae.train.run import fit, resolve
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer

#: small but real: d 32, 128 features, 300 steps of 128 rows (~19 epochs of the 1,792 training rows)
SMALL = {"expansion": 4, "batch_size": 128, "tokens": 128 * 300, "lr": 3e-3, "warmup_steps": 20,
         "l1": 0.3, "l1_warmup_steps": 50, "resample_every": 50, "checkpoint_every": 50,
         "seeds": (0,)}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "acts.zarr"
    make_test_store(path, layers=(0, 1), d_model=32, n_docs=64, seq_len=32, chunk_rows=256)
    return path


@pytest.fixture(scope="module")
def trained(store_path: Path, tmp_path_factory: pytest.TempPathFactory, dtype: str) -> Path:
    out = tmp_path_factory.mktemp("ck")
    fit(resolve(TrainConfig(**SMALL, dtype=dtype)), store_path, out, layers=[0], progress=False)
    return out


def test_fit_learns_and_writes_the_contract(store_path: Path, trained: Path, dtype: str) -> None:
    d = trained / "seed_0" / "layer_0"
    for name in ("cfg.json", "sae_weights.safetensors", "head.safetensors", "train_config.json", "metrics.csv"):
        assert (d / name).exists(), name
    assert not (d / "state.pt").exists()  # a finished layer keeps its deliverables, not its resumable state
    log = read_metrics(d)
    assert [r["step"] for r in log] == list(range(300))
    for key in ("loss", "recon_loss", "l1", "info_nce", "diversity", "l0", "fvu", "dead_frac", "lr", "grad_norm_sae",
                "grad_norm_head", "tokens_per_s"):
        assert key in log[0]
    first = sum(r["loss"] for r in log[:10]) / 10
    last = sum(r["loss"] for r in log[-10:]) / 10
    assert last < 0.3 * first
    assert log[-1]["info_nce"] < log[0]["info_nce"]

    sae, head, info = load_layer(d)
    assert info.config == resolve(TrainConfig(**SMALL, dtype=dtype))  # read back into the dataclass it came from
    assert info.layer == 0 and info.complete and info.config.dtype == dtype and info.d_sae == 128
    store = ActivationStore.open(store_path)
    start = store.heldout_start(info.config.heldout_tail_fraction)
    assert info.train_rows == start < store.n_rows
    # the saved SAE takes RAW activations: on the held-out tail it explains at least 90% of the variance
    x = store.read(0, start, store.n_rows).float()
    with torch.no_grad():
        x_hat, f = sae(x)
    assert losses.fvu(x, x_hat).item() < 0.1
    assert 1 < losses.l0(f).item() < 40
    assert isinstance(head, ContrastiveHead)


def test_folding_the_input_scale_gives_raw_unit_sae_and_head() -> None:
    """An SAE and head trained on s * x, folded, take raw x: f_raw = f_scaled / s, x_hat_raw = x_hat / s, and
    the folded head sees the same input its trained self saw (formula in SAE.fold_input_scale)."""
    gen = torch.Generator().manual_seed(0)
    scaled = SAE(8, 24)
    scaled.reset_parameters_(gen)
    head = ContrastiveHead(24, 4, hidden=6)
    with torch.no_grad():
        scaled.b_enc.copy_(torch.randn(24, generator=gen))
        scaled.b_dec.copy_(torch.randn(8, generator=gen))
    s, x = 3.7, torch.randn(50, 8, generator=gen)
    raw, raw_head = scaled.fold_input_scale(s), head.fold_input_scale(s)
    with torch.no_grad():
        x_hat_s, f_s = scaled(s * x)
        x_hat, f = raw(x)
        torch.testing.assert_close(f, f_s / s)
        torch.testing.assert_close(x_hat, x_hat_s / s)
        torch.testing.assert_close(raw_head(f), head(f_s))
        assert (f > 0).any() and (f == 0).any()  # not vacuous: some features fire, some do not


@pytest.mark.parametrize("hidden", [0, 6])
def test_head_files_round_trip_and_repeat_byte_for_byte(tmp_path: Path, hidden: int) -> None:
    head = ContrastiveHead(24, 4, hidden=hidden)
    files = []
    for i in range(8):  # safetensors orders metadata keys at random: 8 equal files rule that out
        (tmp_path / str(i)).mkdir()
        head.save(tmp_path / str(i))
        files.append((tmp_path / str(i) / "head.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    back = ContrastiveHead.load(tmp_path / "0")
    assert (back.d_sae, back.d_out, back.hidden) == (24, 4, hidden)
    f = torch.rand(5, 24)
    assert torch.equal(back(f), head(f))
    # a file of the earlier format (sizes repeated in its metadata) still loads
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, tmp_path / "old" / "head.safetensors",
              metadata={"d_sae": "24", "d_out": "4", "hidden": str(hidden)})
    assert torch.equal(ContrastiveHead.load(tmp_path / "old")(f), head(f))


def test_resume_equals_uninterrupted(store_path: Path, trained: Path, tmp_path: Path, dtype: str) -> None:
    cfg = resolve(TrainConfig(**SMALL, dtype=dtype))
    out = tmp_path / "ck"
    fit(cfg, store_path, out, layers=[0], progress=False, stop_at=130)  # "crashes" after step 129
    d = out / "seed_0" / "layer_0"
    assert not (d / "train_config.json").exists()
    assert torch.load(d / "state.pt", weights_only=False)["step"] == 100
    fit(cfg, store_path, out, layers=[0], progress=False, resume=True)
    ref_sae, ref_head, _ = load_layer(trained / "seed_0" / "layer_0")
    sae, head, _ = load_layer(d)
    for a, b in zip(list(sae.parameters()) + list(head.parameters()),
                    list(ref_sae.parameters()) + list(ref_head.parameters()), strict=True):
        assert torch.equal(a, b)
    steps = [r["step"] for r in read_metrics(d)]
    assert steps == list(range(300))  # the lost steps 100..129 were dropped, then re-logged once


def test_resampling_revives_dead_features() -> None:
    cfg = TrainConfig(expansion=4, batch_size=64, tokens=64 * 100, alpha=0.0, beta=0.0, resample_every=5,
                      warmup_steps=0, lr=1e-4)
    trainer = CSAETrainer(cfg, 8, Runtime(torch.device("cpu"), None), seed=0)
    dead = torch.arange(10)
    with torch.no_grad():
        trainer.sae.b_enc[dead] = -1e4  # these can never fire
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(2000, 8, generator=gen) * 3
    for step in range(5):
        x = torch.randn(64, 8, generator=gen) * 3
        trainer.step(x, step)
        n = trainer.maybe_resample(step, lambda: pool)
    assert n == 10 and torch.equal(trainer.resampled_S, dead)
    sae = trainer.sae
    living = sae.W_enc[:, 10:].norm(dim=0).mean()
    assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), 0.2 * living.expand(10), rtol=1e-5)
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(10), atol=1e-6)
    # each new decoder row points along one of the pool's rows minus b_dec, a different row each
    dirs = torch.nn.functional.normalize(pool - sae.b_dec, dim=1)
    best = (sae.W_dec[dead] @ dirs.T).max(dim=1)
    assert (best.values > 1 - 1e-5).all() and len(set(best.indices.tolist())) == 10
    assert torch.equal(sae.b_enc[dead], torch.zeros(10))
    # the optimiser's state of W_enc (it may update W_enc through its transpose: the same storage)
    t = next(t for t in trainer.opt.param_groups[0]["params"] if t.data_ptr() == sae.W_enc.data_ptr())
    m, v = (s if s.shape == sae.W_enc.shape else s.t() for s in (trainer.opt.state[t]["exp_avg"],
                                                                  trainer.opt.state[t]["exp_avg_sq"]))
    assert m[:, dead].abs().max() == 0 and v[:, dead].abs().max() == 0
    assert m[:, 10:].abs().max() > 0
    with torch.no_grad():
        fired = (sae.encode(pool)[:, dead] > 0).any(dim=0)
    assert fired.all()  # revived: each fires at least on the input it was pointed at


def test_loader_context_pairs_and_heldout(store_path: Path) -> None:
    store = ActivationStore.open(store_path)
    train_rows = store.heldout_start(0.1)
    all_x = store.read(0, 0, store.n_rows).float()
    seq = torch.from_numpy(store.tokens("seq"))

    def batches(**kw: object) -> list[torch.Tensor]:
        loader = ChunkLoader(store, 0, batch_size=64, train_rows=train_rows, scale=1.0, seed=5,
                             shuffle_rows=512, in_memory_max_bytes=0, **kw)  # type: ignore[arg-type]
        it = iter(loader)
        out = [next(it) for _ in range(40)]
        loader.close()
        return out

    got = batches()
    for x in got[:10]:
        rows = torch.cdist(x, all_x).argmin(dim=1)
        assert torch.equal(all_x[rows], x) and (rows < train_rows).all()
        anchors, positives = rows[:32], rows[32:]
        assert torch.equal(seq[anchors], seq[positives]) and (anchors != positives).all()
    again = batches()
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
    resumed = batches(start_step=25)
    assert all(torch.equal(a, b) for a, b in zip(got[25:], resumed, strict=False))
    # two ranks read disjoint chunks that together cover the epoch
    l0 = ChunkLoader(store, 0, batch_size=64, train_rows=train_rows, scale=1.0, seed=5,
                     shuffle_rows=512, in_memory_max_bytes=0, rank=0, world=2)
    l1 = ChunkLoader(store, 0, batch_size=64, train_rows=train_rows, scale=1.0, seed=5,
                     shuffle_rows=512, in_memory_max_bytes=0, rank=1, world=2)
    c0 = {c for b in _first_epoch(l0) for c in b.chunks}
    c1 = {c for b in _first_epoch(l1) for c in b.chunks}
    assert not c0 & c1 and c0 | c1 == set(range(l0.n_chunks))


def _first_epoch(loader: ChunkLoader) -> list[Buffer]:
    return list(itertools.takewhile(lambda b: b.epoch == 0, loader.buffers()))


# ----- bad input, through the CLI -----

ARGS = ["--set", "tokens=2560", "batch_size=128", "expansion=2", "warmup_steps=5", "seeds=0", "--no-progress"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["fit", *args])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == (result.exit_code != 0)  # a failure is exactly one `error: ...` line
    return result.exit_code, result.output


def test_missing_and_incomplete_store(tmp_path: Path) -> None:
    code, out = run("--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "ck"), *ARGS)
    assert code == 2 and "does not exist" in out
    schema.create(tmp_path / "inc.zarr", layers=[0], d_model=8, capacity=100, chunk_rows=50, attrs={})
    code, out = run("--store", str(tmp_path / "inc.zarr"), "--out", str(tmp_path / "ck"), *ARGS)
    assert code == 2 and "incomplete" in out
    assert not (tmp_path / "ck").exists()


def test_layer_not_in_store(store_path: Path, tmp_path: Path) -> None:
    code, out = run("--store", str(store_path), "--layers", "7", "--out", str(tmp_path / "ck"), *ARGS)
    assert code == 2 and "layer 7 is not in the store" in out


def test_unwritable_out_and_existing_run(store_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run("--store", str(store_path), "--out", str(blocker / "ck"), *ARGS)
    assert code == 2 and "cannot write to output directory" in out
    assert blocker.read_text() == "x"
    ck = tmp_path / "ck"
    assert run("--store", str(store_path), "--layers", "0", "--out", str(ck), *ARGS)[0] == 0
    before = (ck / "seed_0" / "layer_0" / "sae_weights.safetensors").read_bytes()
    code, out = run("--store", str(store_path), "--layers", "0", "--out", str(ck), *ARGS)
    assert code == 2 and "--resume" in out
    assert (ck / "seed_0" / "layer_0" / "sae_weights.safetensors").read_bytes() == before


def test_resume_with_other_d_in_refused(store_path: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    fit(resolve(TrainConfig(tokens=2560, batch_size=128, expansion=2, checkpoint_every=5, seeds=(0,))), store_path, ck,
        layers=[0], progress=False, stop_at=12)
    state = (ck / "seed_0" / "layer_0" / "state.pt").read_bytes()
    other = tmp_path / "other.zarr"
    make_test_store(other, layers=(0,), d_model=16, n_docs=16, seq_len=32)
    code, out = run("--store", str(other), "--layers", "0", "--out", str(ck), "--resume", *ARGS)
    assert code == 2 and "d_in=32" in out and "d_model=16" in out
    assert (ck / "seed_0" / "layer_0" / "state.pt").read_bytes() == state


def test_nan_activations_stop_with_step_and_layer(tmp_path: Path) -> None:
    path = tmp_path / "nan.zarr"
    make_test_store(path, layers=(0, 3), d_model=16, n_docs=16, seq_len=32)
    bad = schema.bf16_to_bits(torch.full((1, 16), float("nan")))
    zarr.open_group(str(path), mode="r+")[schema.acts_name(3)][40:41] = bad
    ck = tmp_path / "ck"
    code, out = run("--store", str(path), "--layers", "3", "--out", str(ck), *ARGS)
    assert code == 2 and "layer 3, step 0" in out and "row 40" in out
    layer = ck / "seed_0" / "layer_3"
    assert not (layer / "state.pt").exists() and not (layer / "sae_weights.safetensors").exists()


def test_augment_positives_and_paper_preset_warning(store_path: Path, tmp_path: Path, dtype: str) -> None:
    cfg = resolve(TrainConfig(positives="augment", tokens=128 * 20, batch_size=128, expansion=2, warmup_steps=2,
                              dtype=dtype, seeds=(0,)))
    last = fit(cfg, store_path, tmp_path / "aug", layers=[1], progress=False)[0, 1]
    assert 0 < last["info_nce"] < 10 and last["diversity"] > 0
    code, out = run("--store", str(store_path), "--layers", "0", "--out", str(tmp_path / "paper"), "--preset",
                    "paper", "--set", "tokens=1280", "--no-progress")
    assert code == 0 and "warning: warmup_steps (1000) exceeds the run's 2 steps" in out
    info = LayerInfo.read(tmp_path / "paper" / "seed_0" / "layer_0").config
    assert (info.expansion, info.l1, info.dtype, info.lr) == (1, 0.04, "bfloat16", 1e-4)
