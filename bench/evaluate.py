"""Benchmark: how much cheaper an SAE is to evaluate when eight SAEs of one layer share evaluate's work.

Evaluates 1 SAE, then 8 SAEs of the same layer (copies of one trained checkpoint under 8 run names: the
same work as 8 different SAEs, no result is shared between them), every family on, on the same store with
a small evaluation config (--full: the params file's), the language model loaded once beforehand. Prints
both times, the marginal cost of one more SAE at the layer, (T(8) - T(1)) / 7, and the profile of the 8-SAE
run (eval_config.json timings). Last line: `ratio X`, X = 8 x T(1) / T(8) (~1 when nothing is shared).

    python bench/evaluate.py [--store data/acts.zarr] [--checkpoint checkpoints/csae/k_64/seed_0/layer_8]
                             [--dtype float32] [--full]

With --fit N1 N2 ...: instead, evaluate copies of the runs' main point (--runs, --point: csae and baseline at
k_64, 12 SAEs: 2 runs x 2 seeds x 3 layers) under more run names until N SAEs, with the params file's config,
and fit time = fixed + per-SAE x N by least squares (the frontier's shape: several SAEs per layer). Last line:
`ratio <per-SAE / fixed>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from csae.evaluate.lm.passes import load_lm
from csae.evaluate.run import evaluate, load_checkpoints
from csae.shared.config.base import from_dict, load_params
from csae.shared.config.evaluate import EvalConfig
from csae.shared.device import resolve_dtype
from csae.shared.entry import cache_dir
from csae.shared.lm.models import LoadedModel
from csae.shared.store.schema import ActivationStore

#: The small evaluation: every family on, each on less data than the default (times scale about linearly).
SMALL = {"recon_tokens": 8192, "ce_tokens": 512, "unlearn_known": 500, "select_tokens": 2048,
         "head_rows": 4096, "head_steps": 100, "contrastive_batches": 8, "topic_permutations": 200,
         "bootstrap_resamples": 500}


def runs(checkpoint: Path, root: Path, n: int) -> list[Path]:
    """n run directories, each holding the checkpoint as seed_0/<its layer folder>."""
    out = []
    for i in range(n):
        run = root / f"run_{i}"
        shutil.copytree(checkpoint, run / "seed_0" / checkpoint.name)
        out.append(run)
    return out


def fit(cfg: EvalConfig, store: Path, run_dirs: list[Path], point: str, sizes: list[int], lm: LoadedModel) -> None:
    """Time evaluate on N SAEs (copies of the runs' `point`) for each N in `sizes`; print the fit fixed +
    per-SAE x N."""
    per_copy = sum(len(load_checkpoints(ActivationStore.open(store), store, [r / point])) for r in run_dirs)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            copies = -(-n // per_copy)
            dirs = []
            for k, run in ((k, r) for k in range(copies) for r in run_dirs):
                dirs.append(Path(tmp) / f"n{n}" / f"{run.name}_{k}")
                shutil.copytree(run / point, dirs[-1] / point)
            t0 = time.perf_counter()
            evaluate(cfg, store, dirs, Path(tmp) / f"eval{n}", cache_dir=cache_dir(), progress=False, lm=lm)
            points.append((copies * per_copy, time.perf_counter() - t0))
            timings = json.loads((Path(tmp) / f"eval{n}" / "eval_config.json").read_text())["timings"]
            print(f"{points[-1][0]} SAEs: {points[-1][1]:.1f} s; " +
                  ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items()), flush=True)
            shutil.rmtree(Path(tmp) / f"n{n}")
    per_sae, fixed = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    print(f"fit: time = {fixed:.1f} s + {per_sae:.2f} s x SAEs (dtype {cfg.dtype})")
    print(f"ratio {per_sae / fixed:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("data/acts.zarr"))
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/csae/k_64/seed_0/layer_8"),
                        help="a trained layer directory (seed_<s>/layer_<L> of a `train fit --out`)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dtype", default="float32", help="language model dtype (the targets: float32)")
    parser.add_argument("--full", action="store_true", help="the params file's evaluate section as it is")
    parser.add_argument("--fit", type=int, nargs="+", default=None, help="SAE counts to fit (e.g. 12 24 48)")
    parser.add_argument("--runs", type=Path, nargs="+",
                        default=[Path("checkpoints/csae"), Path("checkpoints/baseline")])
    parser.add_argument("--point", default="k_64", help="--fit: the runs' point directory copied (the main point)")
    args = parser.parse_args()
    cfg = from_dict(EvalConfig, {**load_params(str(args.params), "evaluate"),
                                 **({} if args.full or args.fit else SMALL), "dtype": args.dtype})
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))
    lm = load_lm(ActivationStore.open(args.store), cache_dir(), model=cfg.model, dtype=cfg.dtype, device=cfg.device)
    if args.fit:
        fit(cfg, args.store, args.runs, args.point, args.fit, lm)
        return
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 8):
            dirs = runs(args.checkpoint, Path(tmp) / f"n{n}", n)
            t0 = time.perf_counter()
            evaluate(cfg, args.store, dirs, Path(tmp) / f"eval{n}", cache_dir=cache_dir(), progress=False, lm=lm)
            times[n] = time.perf_counter() - t0
            print(f"{n} SAE(s) of {args.checkpoint.name}: {times[n]:.1f} s", flush=True)
        profile = json.loads((Path(tmp) / "eval8" / "eval_config.json").read_text())["timings"]
    print("profile of the 8-SAE run: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in profile.items()))
    print(f"marginal cost of one more SAE at the layer: {(times[8] - times[1]) / 7:.1f} s "
          f"(T(1) {times[1]:.1f} s, T(8) {times[8]:.1f} s, dtype {cfg.dtype})")
    print(f"ratio {8 * times[1] / times[8]:.2f}")


if __name__ == "__main__":
    main()
