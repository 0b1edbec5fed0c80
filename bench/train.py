"""Benchmark: `train fit`'s trainer against a bare dense PyTorch loop of the same math, same data, same run.

For each size (d_model x expansion) and dtype (float32, bfloat16 autocast), on a synthetic store:
  bare   a minimal dense loop: batch from a tensor in RAM, encode/decode, MSE + L1, backward, decoder-gradient
         projection, clip, AdamW (torch's default implementation), renormalise
  plain  the real trainer (loader thread, logging, checkpoints) with alpha = beta = 0
  csae   the real trainer with the full loss (InfoNCE on context pairs, diversity)
  paired the plain and the CSAE trainer's steps alternating on the same batches in one process (no loader):
         the CSAE's extra cost per step, with the machine's drift between runs paired out
Neither resamples: the bare loop does not, and the pipeline's baseline resamples exactly as the CSAE does, so
resampling is no part of the CSAE's extra cost (a round of 300 steps would hold two resamplings, one of 100
none).
The trainers start with their encoder biases set so that each row fires --l0 features, the L0 the default
L1 reaches on real data (50 of 2,560 on layer 8 of Gemma 3 270M; ~80 for a 16k dictionary), so the
timing sees training's steady state rather than the first steps of a fresh SAE, where half the features
fire; they train at lr 1e-5 so that the density stays there for the timed steps (at the default lr the
synthetic rows pull a fresh SAE to ~2x the L0 within 60 steps; a step's cost depends on its density, not
on lr). The bare loop's cost does not depend on either. Timing skips the first steps (warm-up, first buffer).
Each of --repeats rounds runs the three next to each other (in reversed order every other round); the speeds
printed are medians over rounds, the ratios medians of each round's ratio, so that a slow spell of a shared
machine moves numerator and denominator together. Each ratio comes with a 90% distribution-free interval for
the median over rounds (the unit of resampling is the round; scipy's quantile_test, order statistics) and
a verdict against its target: met when the whole interval meets it, missed when none of it does, undecided
otherwise (more rounds narrow it). The last line is `ratio <plain trainer / bare>` at the default settings
(640 x 4) in the dtype `auto` resolves to on this machine.

    python bench/train.py [--steps 100] [--repeats 9] [--sizes 640x4:50 2304x8:80] [--profile]

--profile prints where the trainer's time goes (torch.profiler, grouped by the trainer's labels).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from csae.shared.config.train import TrainConfig
from csae.shared.device import resolve_dtype, timed_dtypes
from csae.shared.sae.checkpoint import layer_dir, read_metrics
from csae.shared.store.schema import ActivationStore, make_test_store
from csae.train import trainer as trainer_module
from csae.train.run import fit, resolve, runtime
from csae.train.training_sae import TrainingSAE

BATCH = 512
SKIP = 5  # warm-up steps left out of every timing
CONFIDENCE = 0.9
#: The issue's targets: plain `train fit` at least 2x the bare loop, the CSAE's step at most 25% dearer.
MIN_SPEEDUP, MAX_CSAE_COST = 2.0, 0.25
#: The two trainers' settings over the defaults: neither resamples (see above); plain has no contrastive terms.
TRAINERS: dict[str, dict[str, Any]] = {"plain": {"resample_every": 0, "alpha": 0.0, "beta": 0.0},
                                       "csae": {"resample_every": 0}}


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(median, low, high): the median of per-round values and a distribution-free interval for the median of
    the distribution they are drawn from, from their order statistics (scipy's quantile_test). With 5 rounds
    it is [min, max] at 94% coverage, with 9 the 2nd and 8th values at 96%; below 5 rounds it is undefined
    (nan)."""
    ci = stats.quantile_test(values, p=0.5).confidence_interval(confidence)
    return statistics.median(values), float(ci.low), float(ci.high)


def verdict(low: float, high: float, *, at_least: float = -math.inf, at_most: float = math.inf) -> str:
    """'met' when the whole interval [low, high] lies within the target, 'missed' when none of it does,
    'undecided' otherwise (also when the interval is undefined)."""
    if math.isnan(low) or math.isnan(high):
        return "undecided"
    if at_least <= low and high <= at_most:
        return "met"
    if high < at_least or low > at_most:
        return "missed"
    return "undecided"


def bare_loop(x_ND: torch.Tensor, expansion: int, steps: int, dtype: torch.dtype | None) -> float:
    """steps/s of the plain SAE step written out, dense, with nothing else around it."""
    d = x_ND.shape[1]
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(d * expansion, d, generator=gen), dim=1)
    params = [W_dec.T.clone().requires_grad_(), torch.zeros(d * expansion).requires_grad_(),
              W_dec.requires_grad_(), torch.zeros(d).requires_grad_()]
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


class FiringAt:
    """Patch TrainingSAE.init_b_dec_ so that a fresh SAE's features fire `l0` per row (on the b_dec sample):
    each feature's bias is minus its (1 - l0/F) quantile of pre-activations."""

    def __init__(self, l0: int) -> None:
        self.l0, self.original = l0, TrainingSAE.init_b_dec_

    def __enter__(self) -> None:
        original, l0 = self.original, self.l0

        @torch.no_grad()
        def init(trainer: Any, sample_ND: torch.Tensor, iters: int = 30) -> None:
            original(trainer, sample_ND, iters)
            sae = trainer.sae
            pre = (sample_ND - sae.b_dec) @ sae.W_enc
            sae.b_enc.copy_(-torch.quantile(pre, 1 - l0 / sae.d_sae, dim=0))

        TrainingSAE.init_b_dec_ = init  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        TrainingSAE.init_b_dec_ = self.original  # type: ignore[method-assign]


def bench_config(steps: int, expansion: int, dtype: str, trainer: str) -> TrainConfig:
    """The config of a timed trainer (`trainer`: a key of TRAINERS), resolved for this machine."""
    return resolve(TrainConfig(expansion=expansion, batch_size=BATCH, tokens=BATCH * steps, dtype=dtype,  # type: ignore[arg-type]
                               warmup_steps=10, l1_warmup_steps=0, lr=1e-5,  # the steady state's L1 and L0
                               checkpoint_every=10**9, seeds=(0,), **TRAINERS[trainer]))


def trainer_run(store: Path, out: Path, steps: int, expansion: int, l0: int, dtype: str,
                trainer: str) -> tuple[float, float]:
    """(steps/s of the real trainer from the elapsed time it logs per step, mean L0 over the timed steps)."""
    cfg = bench_config(steps, expansion, dtype, trainer)
    with FiringAt(l0):
        fit(cfg, store, out, layers=[0], overwrite=True, progress=False)
    log = read_metrics(layer_dir(out, 0, 0))
    timed = log[SKIP:]
    return (len(timed) - 1) / (log[-1]["elapsed_s"] - log[SKIP]["elapsed_s"]), statistics.mean(r["l0"] for r in timed)


def paired_step_cost(x_ND: torch.Tensor, steps: int, expansion: int, l0: int, dtype: str
                     ) -> tuple[float, float, float]:
    """(CSAE step time / plain step time - 1, L0 plain, L0 CSAE): the two trainers of trainer_run (same seed,
    same start) step alternately on the same batches, which of them goes first alternating, so the machine's
    drift reaches both alike; total time over the steps after SKIP, each step until its metrics are on the
    host (as train fit reads them)."""
    trainers = {}
    for name in TRAINERS:
        cfg = bench_config(steps, expansion, dtype, name)
        with FiringAt(l0):
            trainers[name] = trainer_module.CSAETrainer(cfg, x_ND.shape[1], runtime(cfg), seed=0)
            trainers[name].model.init_b_dec_(x_ND[:4096])
    gen = torch.Generator().manual_seed(1)
    spent = {"plain": 0.0, "csae": 0.0}
    l0s: dict[str, list[float]] = {"plain": [], "csae": []}
    for step in range(steps):
        x = x_ND[torch.randint(len(x_ND), (BATCH,), generator=gen)]
        for name in ("plain", "csae")[:: 1 if step % 2 == 0 else -1]:
            t = time.perf_counter()
            metrics = trainers[name].step(x, step)
            values = torch.stack([metrics[k].float() for k in trainer_module.METRIC_NAMES]).tolist()
            if step >= SKIP:
                spent[name] += time.perf_counter() - t
                l0s[name].append(values[trainer_module.METRIC_NAMES.index("l0")])
    return spent["csae"] / spent["plain"] - 1, statistics.mean(l0s["plain"]), statistics.mean(l0s["csae"])


def profile(store: Path, out: Path, steps: int, expansion: int, l0: int, dtype: str, trainer: str) -> None:
    """Where the trainer's time goes: self CPU time per label of the training loop and step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer_run(store, out, steps, expansion, l0, dtype, trainer)
    events = [e for e in prof.key_averages() if e.key.startswith("csae.")]
    total = sum(e.cpu_time_total for e in events if e.key.count(".") == 1)
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        print(f"    {e.key:24s} {e.cpu_time_total / 1e3 / e.count:8.2f} ms/call  {e.count:5d} calls  "
              f"{e.cpu_time_total / max(total, 1):6.1%} of the loop")


def rounds(store: Path, ck: Path, x_ND: torch.Tensor, steps: int, repeats: int, expansion: int, l0: int,
           dtype: str) -> dict[str, list[float]]:
    """Per round: steps/s of the bare loop, plain and CSAE `train fit`, the paired step cost, and the L0s."""
    ac = torch.bfloat16 if dtype == "bfloat16" else None
    out: dict[str, list[float]] = {k: [] for k in ("bare", "plain", "csae", "paired", "l0 plain", "l0 csae",
                                                    "l0 paired plain", "l0 paired csae")}
    for r in range(repeats):
        # interleaved, the order reversed every other repeat: drifting background load hits all of them alike, and
        # each ratio below pairs runs made next to each other
        for name in ("bare", "plain", "csae", "paired")[:: 1 if r % 2 == 0 else -1]:
            if name == "bare":
                out["bare"].append(bare_loop(x_ND, expansion, steps, ac))
            elif name == "paired":
                cost, l0_plain, l0_csae = paired_step_cost(x_ND, steps, expansion, l0, dtype)
                out["paired"].append(cost)
                out["l0 paired plain"].append(l0_plain)
                out["l0 paired csae"].append(l0_csae)
            else:
                rate, got = trainer_run(store, ck, steps, expansion, l0, dtype, name)
                out[name].append(rate)
                out["l0 " + name].append(got)
    return out


def report(d: int, expansion: int, dtype: str, steps: int, out: dict[str, list[float]]) -> float:
    """Prints a size and dtype's figures, intervals and verdicts; returns plain/bare."""
    med = {k: statistics.median(v) for k, v in out.items()}
    mean = {k: statistics.mean(v) for k, v in out.items()}
    # each round's ratios pair runs made next to each other; the figures are their medians
    speedups = [p / b for p, b in zip(out["plain"], out["bare"], strict=True)]
    costs = [p / c - 1 for p, c in zip(out["plain"], out["csae"], strict=True)]
    speedup, s_low, s_high = median_interval(speedups)
    cost, c_low, c_high = median_interval(costs)
    paired, p_low, p_high = median_interval(out["paired"])
    print(f"d={d:5d} x{expansion} {dtype:8s} L0 plain {mean['l0 plain']:5.1f} csae {mean['l0 csae']:5.1f}  bare "
          f"{med['bare']:7.2f} steps/s  plain {med['plain']:7.2f} steps/s ({med['plain'] * BATCH:8,.0f} tok/s)  csae "
          f"{med['csae']:7.2f} steps/s  plain/bare {speedup:.2f} [{s_low:.2f}, {s_high:.2f}]  csae cost in train fit "
          f"{cost:+.1%} [{c_low:+.1%}, {c_high:+.1%}]  csae step cost, paired steps {paired:+.1%} [{p_low:+.1%}, "
          f"{p_high:+.1%}] (L0 {mean['l0 paired plain']:.1f} and {mean['l0 paired csae']:.1f}) (medians of "
          f"{len(speedups)} rounds of {steps} steps, {CONFIDENCE:.0%} intervals over rounds)", flush=True)
    print(f"    plain/bare >= {MIN_SPEEDUP}: {verdict(s_low, s_high, at_least=MIN_SPEEDUP)};  csae cost <= "
          f"{MAX_CSAE_COST:.0%}: {verdict(c_low, c_high, at_most=MAX_CSAE_COST)} in train fit, "
          f"{verdict(p_low, p_high, at_most=MAX_CSAE_COST)} paired;  per round: plain/bare "
          + " ".join(f"{r:.2f}" for r in speedups) + "  csae cost " + " ".join(f"{c:+.0%}" for c in costs)
          + "  paired " + " ".join(f"{c:+.0%}" for c in out["paired"]))
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sizes", nargs="+", default=["640x4:50", "2304x8:80"], help="d_model x expansion : L0")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32, and bfloat16 where `auto` gives it (csae.shared.device.timed_dtypes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also profile the plain and CSAE trainers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = resolve_dtype("auto", "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, auto dtype here: {native}, batch {BATCH}")
    dtypes = args.dtypes or timed_dtypes()
    print(f"dtypes timed: {' '.join(dtypes)} (default: float32, and bfloat16 where this CPU has it natively)")
    headline = None
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shape, l0 = size.split(":")
            d, expansion = (int(v) for v in shape.split("x"))
            store = Path(tmp) / f"d{d}.zarr"
            make_test_store(store, layers=(0,), d_model=d, n_docs=128, seq_len=64, chunk_rows=1024)
            s = ActivationStore.open(store)
            x_ND = s.read(0, 0, s.heldout_start(0.1)).float() * (d**0.5 / s.mean_norm(0))
            small = d * expansion <= 4096  # the large size: fewer, shorter rounds (a bare step takes seconds)
            steps = args.steps if small else max(SKIP + 7, args.steps // 8)
            repeats = args.repeats if small else min(args.repeats, 5)  # 5: the fewest with an interval
            for dtype in dtypes:
                out = rounds(store, Path(tmp) / "ck", x_ND, steps, repeats, expansion, int(l0), dtype)
                speedup = report(d, expansion, dtype, steps, out)
                if args.profile:
                    for name in TRAINERS:
                        print(f"  profile {name}:")
                        profile(store, Path(tmp) / "ck", steps, expansion, int(l0), dtype, name)
                if headline is None or (d == 640 and expansion == 4 and dtype == native):
                    headline = speedup
    print(f"ratio {headline:.2f}")


if __name__ == "__main__":
    main()
