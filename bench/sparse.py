"""Benchmark: the trainer's step on the sparse path against the dense path, over feature densities.

The real CSAETrainer step (forward, backward, clip, AdamW, renormalisation) at d=640, expansion 4,
batch 512, alpha = beta = 0, with the encoder bias set so that a chosen share of the B x F features is
active (lr 1e-9, so the density stays put). Steps are timed in interleaved rounds (background load hits
both paths alike); medians. Prints ms per step and dense/sparse for each density and dtype, and the
break-even density per dtype (what train/sparse.py SPARSE_BELOW holds). Last line: `ratio <dense/sparse
at 2% density in the dtype auto gives here>`.

    python bench/sparse.py [--densities 0.02 0.05 0.1 0.15 0.2 0.3 0.4] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from csae.shared.config.train import TrainConfig
from csae.shared.device import resolve_dtype, timed_dtypes
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer

BATCH = 512


def make_trainer(d: int, expansion: int, density: float, dtype: str, mode: str, x_BD: torch.Tensor) -> CSAETrainer:
    cfg = TrainConfig(expansion=expansion, batch_size=BATCH, tokens=BATCH * 10**6, alpha=0.0, beta=0.0, lr=1e-9,
                      warmup_steps=0, resample_every=0, sparse=mode, dtype=dtype)  # type: ignore[arg-type]
    rt = Runtime(torch.device("cpu"), torch.bfloat16 if dtype == "bfloat16" else None)
    trainer = CSAETrainer(cfg, d, rt, seed=0)
    with torch.no_grad():  # per-feature thresholds: each feature active on `density` of the rows
        pre_BF = (x_BD - trainer.sae.b_dec) @ trainer.sae.W_enc
        trainer.sae.b_enc.copy_(-torch.quantile(pre_BF, 1 - density, dim=0))
    return trainer


def ms_per_step(trainer: CSAETrainer, x_BD: torch.Tensor, steps: int) -> float:
    trainer.step(x_BD, 0)  # warm-up (and, in auto mode, the density of the previous step)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step(x_BD, step)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4])
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32, and bfloat16 where `auto` gives it (csae.shared.device.timed_dtypes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = resolve_dtype("auto", "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, auto dtype here: {native}; d={args.d} "
          f"expansion {args.expansion} batch {BATCH}")
    x_BD = torch.randn(BATCH, args.d, generator=torch.Generator().manual_seed(0))
    headline = None
    for dtype in args.dtypes or timed_dtypes():
        even = None
        for density in args.densities:
            trainers = {m: make_trainer(args.d, args.expansion, density, dtype, m, x_BD) for m in ("off", "on")}
            got = trainers["on"].step(x_BD, 0)["l0"].item() / (args.d * args.expansion)
            times: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for mode, trainer in trainers.items():
                    times[mode].append(ms_per_step(trainer, x_BD, args.steps))
            dense, sparse = statistics.median(times["off"]), statistics.median(times["on"])
            print(f"{dtype:8s} density {got:6.3f}  dense {dense:7.2f} ms  sparse {sparse:7.2f} ms  "
                  f"dense/sparse {dense / sparse:5.2f}", flush=True)
            if dense > sparse:
                even = density
            if dtype == native and density == 0.02:
                headline = dense / sparse
        print(f"{dtype:8s} sparse pays up to density {even}")
    print(f"ratio {headline:.2f}" if headline is not None else "ratio nan")


if __name__ == "__main__":
    main()
