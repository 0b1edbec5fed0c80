"""Benchmark: csae's training step against SAELens' (`SAETrainer`) on the same batches, in one run.

Needs the `peers` extra (`pip install -e ".[peers]"`; not in CI). For each dtype (float32, bfloat16
autocast) at the default settings (d_model 640, expansion 4, batch 512) on bench/train.py's synthetic store:
  saelens  SAELens' StandardTrainingSAE (ReLU, L1 1.0) through SAETrainer._train_step: forward, backward,
           clip 1.0, Adam, schedulers, dead-feature counters; batches from a tensor in RAM
  plain    csae's trainer with alpha = beta = 0 (`train fit`: loader thread, logging, checkpoints)
  csae     csae's trainer with the full loss
csae's trainers start at --l0 active features per row (bench/train.py's FiringAt, the density the default
L1 reaches on real rows); SAELens' step is dense, so its cost does not depend on the density. Medians of
--repeats interleaved runs. The last line is `ratio <csae plain / SAELens>` in the dtype `auto` resolves to.

    python bench/peers.py [--steps 60] [--repeats 3] [--l0 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from csae.shared.device import resolve_dtype, timed_dtypes
from csae.shared.store.schema import ActivationStore, make_test_store
from train import BATCH, SKIP, trainer_run


def saelens_loop(x_ND: torch.Tensor, expansion: int, steps: int, autocast: bool) -> float:
    """steps/s of SAELens' training step on batches of x_ND."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d = x_ND.shape[1]
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=d * expansion, l1_coefficient=1.0))
    cfg = SAETrainerConfig(total_training_samples=BATCH * steps, train_batch_size_samples=BATCH, lr=5e-4,
                           lr_end=5e-4, device="cpu", autocast=autocast)
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    gen = torch.Generator().manual_seed(0)
    t0 = 0.0
    for step in range(steps):
        if step == SKIP:
            t0 = time.perf_counter()
        out = trainer._train_step(sae, x_ND[torch.randint(len(x_ND), (BATCH,), generator=gen)])
        out.loss.item()  # as csae's trainer, read the step's metrics every step
    return (steps - SKIP) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--l0", type=int, default=50)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32, and bfloat16 where `auto` gives it (csae.shared.device.timed_dtypes)")
    args = parser.parse_args()
    import sae_lens

    native = resolve_dtype("auto", "cpu")
    print(f"torch {torch.__version__}, SAELens {sae_lens.__version__}, {torch.get_num_threads()} threads, "
          f"auto dtype here: {native}, batch {BATCH}, d 640 x4")
    headline = None
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "d640.zarr"
        make_test_store(store, layers=(0,), d_model=640, n_docs=128, seq_len=64, chunk_rows=1024)
        s = ActivationStore.open(store)
        x_ND = s.read(0, 0, s.heldout_start(0.1)).float() * (640**0.5 / s.mean_norm(0))
        for dtype in args.dtypes or timed_dtypes():
            runs: dict[str, list[float]] = {"saelens": [], "plain": [], "csae": []}
            for _ in range(args.repeats):  # interleaved, so background load hits all three alike
                runs["saelens"].append(saelens_loop(x_ND, 4, args.steps, dtype == "bfloat16"))
                runs["plain"].append(trainer_run(store, Path(tmp) / "ck", args.steps, 4, args.l0, dtype,
                                                 alpha=0.0, beta=0.0, resample_every=0)[0])
                runs["csae"].append(trainer_run(store, Path(tmp) / "ck", args.steps, 4, args.l0, dtype)[0])
            med = {k: statistics.median(v) for k, v in runs.items()}
            print(f"{dtype:8s} SAELens {med['saelens']:7.2f} steps/s  csae plain {med['plain']:7.2f}  csae full "
                  f"{med['csae']:7.2f}  plain/SAELens {med['plain'] / med['saelens']:.2f}  full/SAELens "
                  f"{med['csae'] / med['saelens']:.2f}", flush=True)
            if headline is None or dtype == native:
                headline = med["plain"] / med["saelens"]
    print(f"ratio {headline:.2f}")


if __name__ == "__main__":
    main()
