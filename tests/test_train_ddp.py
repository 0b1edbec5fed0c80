"""Data-parallel training with 2 CPU processes (gloo): runs, ranks stay identical and resample the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from csae.shared.config.train import TrainConfig
from csae.shared.sae.checkpoint import read_metrics
from csae.shared.store.schema import make_test_store
from csae.train.run import fit, resolve
from csae.train.trainer import CSAETrainer

pytestmark = pytest.mark.slow  # subprocesses and ranks: the full suite only

#: strong sparsity and a wide dictionary so that features die and get resampled within the run
CFG = {"expansion": 8, "batch_size": 128, "tokens": 128 * 60, "l1": 20.0, "lr": 1e-2, "warmup_steps": 2,
       "l1_warmup_steps": 0,  # the full L1 from the start: many features die, so resampling runs
       "resample_every": 5, "checkpoint_every": 1000, "beta": 1.0, "seeds": (0,)}


#: per architecture: the top-k ones with k = 1 of 256 features, so that features die (Aux-K and resampling on)
ARCH = {"relu": {}, "topk": {"architecture": "topk", "k": 1, "dead_steps": 5},
        "batchtopk": {"architecture": "batchtopk", "k": 1, "dead_steps": 5},
        # T-SAE: BatchTopK with its Matryoshka prefix and InfoNCE on adjacent tokens' high-level codes
        "tsae": {"architecture": "batchtopk", "k": 1, "dead_steps": 5, "alpha": 0.1, "positives": "adjacent",
                 "matryoshka_high": 0.2, "contrast_on": "high_level"}}


def _worker(rank: int, tmp: str, dtype: str, arch: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    events: list[dict] = []

    def record(step: int, trainer: CSAETrainer) -> None:
        events.append({"step": step, "features": trainer.resampled_S.tolist(),
                       "w_dec": trainer.sae.W_dec.double().sum().item(),
                       "w_enc": trainer.sae.W_enc.double().sum().item()})

    try:
        cfg = resolve(TrainConfig(**{**CFG, **ARCH[arch]}, dtype=dtype))  # type: ignore[arg-type]
        fit(cfg, Path(tmp) / "acts.zarr", Path(tmp) / "ck", layers=[0], rank=rank,
            world=2, progress=False, on_resample=record)
    finally:
        dist.destroy_process_group()
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(events))


@pytest.mark.parametrize("arch", sorted(ARCH))
def test_two_ranks_agree(tmp_path: Path, dtype: str, arch: str) -> None:
    make_test_store(tmp_path / "acts.zarr", layers=(0,), d_model=32, n_docs=64, seq_len=32)
    mp.spawn(_worker, args=(str(tmp_path), dtype, arch), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0) == len(r1) >= 4
    assert sum(len(e["features"]) for e in r0) >= 10  # something was actually resampled
    assert r0 == r1  # same features, same weights after every resampling
    out = tmp_path / "ck" / "seed_0" / "layer_0"
    assert (out / "sae_weights.safetensors").exists() and (out / "train_config.json").exists()
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(60))  # only rank 0 wrote the log
