"""Benchmark: `train fit`'s trainer against a bare PyTorch loop of the same math, same data, same run.

For each d_model (640, 2304) and dtype (bfloat16 autocast, float32), on a synthetic store:
  bare   a minimal loop: batch from a tensor in RAM, encode/decode, MSE + L1, backward, decoder-gradient
         projection, clip, AdamW, renormalise
  plain  the real trainer (loader thread, logging, checkpoints) with alpha = beta = 0, no resampling
  csae   the real trainer with the full loss (InfoNCE on context pairs, diversity, resampling)
Timing skips the first steps (warm-up, first buffer) and reports the median of --repeats runs.
Prints steps/s and tokens/s; the last line is `ratio <plain-SAE trainer / bare>` at d=640 with the
dtype `auto` resolves to on this machine.

    python bench/train.py [--steps 120] [--repeats 3] [--dims 640 2304]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from csae.shared.checkpoint import layer_dir, read_metrics
from csae.shared.config.train import TrainConfig
from csae.shared.models import resolve_dtype
from csae.shared.schema import ActivationStore, make_test_store
from csae.train.run import fit, resolve

BATCH = 512
SKIP = 5  # warm-up steps left out of every timing


def bare_loop(x_ND: torch.Tensor, steps: int, dtype: torch.dtype | None) -> float:
    """steps/s of the plain SAE step written out with nothing else around it."""
    d = x_ND.shape[1]
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(d, d, generator=gen), dim=1)
    params = [W_dec.T.clone().requires_grad_(), torch.zeros(d).requires_grad_(), W_dec.requires_grad_(),
              torch.zeros(d).requires_grad_()]
    W_enc, b_enc, W_dec, b_dec = params
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    t0 = 0.0
    for step in range(steps):
        if step == SKIP:
            t0 = time.perf_counter()
        idx = torch.randint(len(x_ND), (BATCH,), generator=gen)
        x = x_ND[idx]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
            x_hat = f @ W_dec + b_dec
            loss = (x - x_hat.float()).pow(2).sum(1).mean() + 1.0 * f.float().abs().sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            u = torch.nn.functional.normalize(W_dec, dim=1)
            W_dec.grad -= (W_dec.grad * u).sum(1, keepdim=True) * u
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        loss.item()  # the trainer reads its metrics every step; so does this loop
    return (steps - SKIP) / (time.perf_counter() - t0)


def trainer_run(store: Path, out: Path, steps: int, dtype: str, **overrides: object) -> float:
    """steps/s of the real trainer, from the elapsed time it logs per step."""
    cfg = resolve(TrainConfig(expansion=1, batch_size=BATCH, tokens=BATCH * steps, dtype=dtype,  # type: ignore[arg-type]
                              warmup_steps=10, checkpoint_every=10**9, **overrides))  # type: ignore[arg-type]
    fit(cfg, store, out, layers=[0], overwrite=True, progress=False)
    log = read_metrics(layer_dir(out, cfg.seeds[0], 0))
    return (len(log) - 1 - SKIP) / (log[-1]["elapsed_s"] - log[SKIP]["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dims", type=int, nargs="+", default=[640, 2304])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = resolve_dtype("auto", "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, auto dtype here: {native}")
    headline = None
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dims:
            store = Path(tmp) / f"d{d}.zarr"
            make_test_store(store, layers=(0,), d_model=d, n_docs=128, seq_len=64, chunk_rows=1024)
            s = ActivationStore.open(store)
            x_ND = s.read(0, 0, s.heldout_start(0.1)).float() * (d**0.5 / s.mean_norm(0))
            steps = args.steps if d <= 1024 else max(SKIP + 10, args.steps // 6)
            for dtype in args.dtypes:
                ac = torch.bfloat16 if dtype == "bfloat16" else None
                runs: dict[str, list[float]] = {"bare": [], "plain": [], "csae": []}
                for _ in range(args.repeats):  # interleaved, so background load hits all three alike
                    runs["bare"].append(bare_loop(x_ND, steps, ac))
                    runs["plain"].append(trainer_run(store, Path(tmp) / "ck", steps, dtype, alpha=0.0, beta=0.0,
                                                     resample_every=0))
                    runs["csae"].append(trainer_run(store, Path(tmp) / "ck", steps, dtype))
                med = {k: statistics.median(v) for k, v in runs.items()}
                print(f"d={d:5d} {dtype:8s} bare {med['bare']:7.2f} steps/s ({med['bare'] * BATCH:9,.0f} tok/s)  "
                      f"plain {med['plain']:7.2f} steps/s ({med['plain'] * BATCH:9,.0f} tok/s)  "
                      f"csae {med['csae']:7.2f} steps/s  plain/bare {med['plain'] / med['bare']:.2f}  "
                      f"csae step cost +{med['plain'] / med['csae'] - 1:.0%} over plain", flush=True)
                if headline is None or (d == 640 and dtype == native):
                    headline = med["plain"] / med["bare"]
    print(f"ratio {headline:.2f}")


if __name__ == "__main__":
    main()
