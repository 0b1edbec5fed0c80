"""The TopK and BatchTopK architectures: their selection, forward and gradients against a hand-written dense
reference on both paths, BatchTopK's inference threshold, Aux-K, SAELens' format, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csae.shared.config.train import TrainConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.sae.checkpoint import load_layer
from csae.shared.store.schema import ActivationStore, make_test_store
from csae.train.run import fit, resolve
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer

#: |path - reference| over max |reference|, the reference in float32. float32: summation order only (as
#: tests/test_train_sparse.py). bfloat16: both operands of every product rounded (2 x 2^-9 relative each), through
#: the encoder, the decoder and the gradient's products: a few 2^-8, so 2^-5; a wrong selection or a missing
#: gradient term moves a tensor by 10-100% of its largest element.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2**-5}
K = 4
SMALL = {"expansion": 4, "batch_size": 128, "tokens": 128 * 300, "lr": 3e-3, "warmup_steps": 20,
         "resample_every": 50, "checkpoint_every": 50, "seeds": (0,), "k": 8}


def _trainer(arch: str, dtype: str, mode: str, alpha: float = 0.0, beta: float = 0.0) -> CSAETrainer:
    cfg = TrainConfig(architecture=arch, k=K, expansion=8, batch_size=64, tokens=64 * 100, alpha=alpha, beta=beta,  # type: ignore[arg-type]
                      head_dim=16, warmup_steps=0, resample_every=0, sparse=mode, dtype=dtype, aux_k=0.0)  # type: ignore[arg-type]
    rt = Runtime(torch.device("cpu"), torch.bfloat16 if dtype == "bfloat16" else None)
    trainer = CSAETrainer(cfg, 32, rt, seed=0)
    with torch.no_grad():
        trainer.sae.b_dec.copy_(torch.linspace(-1, 1, 32))
    return trainer


def _x() -> torch.Tensor:
    return torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 3


def _reference_mask(p: np.ndarray, arch: str) -> np.ndarray:
    """Which entries the architecture keeps, by sorting (no topk): the K largest of each row, or the K x B
    largest of the batch, among the positive ones."""
    keep = np.zeros(p.shape, dtype=bool)
    if arch == "topk":
        for b, row in enumerate(p):
            keep[b, np.argsort(-row, kind="stable")[:K]] = True
    else:
        flat = np.argsort(-p.ravel(), kind="stable")[: K * len(p)]
        keep.ravel()[flat] = True
    return keep & (p > 0)


def _step(trainer: CSAETrainer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    trainer.model.sparse_now = trainer.cfg.sparse == "on"
    terms, x_hat, feats = trainer.model.training_forward_pass(x, 0)
    terms["loss"].backward()
    out = {"x_hat": x_hat.detach().float(), "f": feats.dense().detach().float(), "loss": terms["loss"].detach()}
    out.update({"grad " + n: p.grad.detach().clone() for n, p in trainer.sae.named_parameters()})
    return out


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("mode", ["off", "on"])
def test_forward_and_gradients_equal_a_hand_written_reference(arch: str, mode: str, dtype: str) -> None:
    x = _x()
    got = _step(_trainer(arch, dtype, mode), x)
    # the reference: the same weights, every step written out in float32, the selection by sorting
    sae = _trainer(arch, "float32", "off").sae
    W_enc, b_enc, W_dec, b_dec = (t.detach().clone().requires_grad_(True) for t in
                                  (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    p = (x - b_dec) @ W_enc + b_enc
    keep = torch.from_numpy(_reference_mask(p.detach().numpy(), arch))
    if dtype == "bfloat16":  # rounded products may reorder near-ties at the cut: at most a few entries differ
        assert int(((got["f"] > 0) != keep).sum()) <= 4
        keep = got["f"] > 0  # then the values and gradients at the entries bfloat16 kept
    f = torch.where(keep, p, torch.zeros_like(p))
    x_hat = f @ W_dec + b_dec
    loss = ((x_hat - x) ** 2).sum(dim=1).mean()
    loss.backward()
    want = {"x_hat": x_hat.detach(), "f": f.detach(), "loss": loss.detach(), "grad W_enc": W_enc.grad,
            "grad b_enc": b_enc.grad, "grad W_dec": W_dec.grad, "grad b_dec": b_dec.grad}
    nnz = (got["f"] > 0).sum(dim=1)
    if arch == "topk":
        assert torch.equal(nnz, torch.full_like(nnz, K))  # exactly k per row (every row has >= k positive p)
    else:
        assert int(nnz.sum()) == K * len(x) and nnz.min() != nnz.max()  # k x B over the batch, not per row
    assert torch.equal(got["f"] > 0, want["f"] > 0)  # the same entries kept
    worst = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want}
    assert max(worst.values()) < TOLERANCE[dtype], worst


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_path_equals_dense_with_head_and_diversity(arch: str, dtype: str) -> None:
    x = _x()
    a = _step(_trainer(arch, dtype, "off", alpha=2.0, beta=1.0), x)
    b = _step(_trainer(arch, dtype, "on", alpha=2.0, beta=1.0), x)
    assert torch.equal(a["f"], b["f"])
    worst = {k: float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a}
    assert max(worst.values()) < {"float32": 1e-5, "bfloat16": 2**-7}[dtype], worst


def test_aux_k_gives_dead_features_gradients_toward_the_residual() -> None:
    trainer = _trainer("topk", "float32", "on")
    trainer.cfg = cfg = TrainConfig(**{**trainer.cfg.__dict__, "aux_k": 1.0})
    trainer.model.cfg = cfg
    x = _x()
    dead = torch.zeros(trainer.sae.d_sae, dtype=torch.bool)
    dead[::3] = True
    trainer.model.dead_F = dead
    trainer.model.sparse_now = True
    terms, x_hat, feats = trainer.model.training_forward_pass(x, 0)
    # the reference: the top d/2 dead pre-activations of each row, ReLU, decode without b_dec, against x - x_hat
    sae = trainer.sae
    p = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()[:, dead]
    kept = torch.zeros_like(p)
    for b in range(len(p)):
        idx = torch.argsort(p[b], descending=True)[:16]
        kept[b, idx] = p[b, idx].clamp_min(0)
    e_hat = kept @ sae.W_dec.detach()[dead]
    want = ((x - x_hat.detach()) - e_hat).pow(2).sum(1).mean()
    assert torch.allclose(terms["aux_k"], want, rtol=1e-5)
    terms["loss"].backward()
    live_rows = ~dead & ~feats.fired()
    assert sae.W_dec.grad[dead].abs().sum() > 0  # dead features learn
    assert sae.W_dec.grad[live_rows].abs().sum() == 0  # features neither dead nor active get nothing


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arch") / "acts.zarr"
    make_test_store(path, layers=(0,), d_model=32, n_docs=96, seq_len=32, chunk_rows=256)
    return path


def test_batchtopk_threshold_reproduces_the_training_l0_on_heldout_rows(store: Path, tmp_path: Path) -> None:
    fit(resolve(TrainConfig(**SMALL, architecture="batchtopk", dtype="float32")), store, tmp_path, layers=[0],
        progress=False)
    sae, _, info = load_layer(tmp_path / "seed_0" / "layer_0")
    st = ActivationStore.open(store)
    x = st.read(0, info.train_rows, st.n_rows).float()  # raw units: the saved SAE has the scale folded in
    assert len(x) >= 256
    l0 = float((sae.encode(x) > 0).sum(dim=1).float().mean())
    assert sae.activation == "jumprelu" and abs(l0 - 8) / 8 < 0.05, l0
    # the threshold alone sets the code: a threshold 0 would keep every positive pre-activation
    assert float((sae.pre_activation(x) > 0).sum(dim=1).float().mean()) > 2 * 8


#: What SAELens 6 reads from cfg.json for each architecture (sae_lens/saes/*: SAEConfig's fields, plus
#: TopKSAEConfig.k) and the tensors its state dict holds.
SAELENS_FIELDS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                  "reshape_activations", "metadata", "architecture"}
SAELENS_TENSORS = {"standard": {"W_enc", "b_enc", "W_dec", "b_dec"}, "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
                   "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}}


@pytest.mark.parametrize(("activation", "saelens"), [("relu", "standard"), ("topk", "topk"),
                                                     ("jumprelu", "jumprelu")])
def test_saved_sae_is_saelens_format_and_reconstructs_as_its_raw_weights_say(activation: str, saelens: str,
                                                                             tmp_path: Path) -> None:
    sae = SAE(16, 64, activation=activation, k=5)  # type: ignore[arg-type]
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if activation == "jumprelu":
            sae.threshold.uniform_(0.0, 1.0)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert cfg["architecture"] == saelens and SAELENS_FIELDS <= set(cfg)
    assert set(tensors) == SAELENS_TENSORS[saelens]
    if saelens == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    # SAELens' encode written out from the raw tensors
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    p = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if saelens == "standard":
        f = p.relu()
    elif saelens == "topk":
        top = p.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(p).scatter(-1, top.indices, top.values.relu())
    else:
        f = p * (p > tensors["threshold"])
    x_hat = f @ tensors["W_dec"] + tensors["b_dec"]
    got_x_hat, got_f = SAE.load(tmp_path)(x)
    assert torch.allclose(got_f, f, atol=1e-6) and torch.allclose(got_x_hat, x_hat, atol=1e-5)
    assert int((f > 0).sum()) > 0


#: T-SAE's settings (params.yaml runs.tsae) on BatchTopK
TSAE = {"architecture": "batchtopk", "alpha": 0.1, "beta": 0.0, "positives": "adjacent", "matryoshka_high": 0.2,
        "contrast_on": "high_level"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "tsae"])
def test_resume_equals_uninterrupted(arch: str, store: Path, tmp_path: Path) -> None:
    over = TSAE if arch == "tsae" else {"architecture": arch}
    cfg = resolve(TrainConfig(**{**SMALL, "k": 2, "dead_steps": 10, **over}, dtype="float32"))  # type: ignore[arg-type]
    fit(cfg, store, tmp_path / "one", layers=[0], progress=False)
    fit(cfg, store, tmp_path / "two", layers=[0], progress=False, stop_at=130)
    fit(cfg, store, tmp_path / "two", layers=[0], progress=False, resume=True)
    a = load_file(tmp_path / "one" / "seed_0" / "layer_0" / "sae_weights.safetensors")
    b = load_file(tmp_path / "two" / "seed_0" / "layer_0" / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "one" / "seed_0" / "layer_0" / "metrics.csv").read_text().splitlines()
    aux = [float(r.split(",")[log[0].split(",").index("aux_k")]) for r in log[1:]]
    assert max(aux) > 0  # Aux-K was on (some features were dead) in the run that was resumed
