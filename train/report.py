"""The per-step row of metrics.csv and the progress bar of one layer's training (tokens/s, steps/s, ETA).

    layer_<L>/metrics.csv    one row per step, appended as training goes (DVC plots it)
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from torch.profiler import record_function
from tqdm import tqdm

from csae.shared.config.train import TrainConfig
from csae.shared.files import atomic_write
from csae.shared.sae.checkpoint import METRICS_FILE, read_metrics


class StepReport:
    """Writes each step's metrics (only on the writing rank) and moves the bar."""

    def __init__(self, cfg: TrainConfig, directory: Path, layer: int, start_step: int, end: int, *, writer: bool,
                 progress: bool) -> None:
        self.cfg, self.start_step, self.end = cfg, start_step, end
        self.log = MetricsLog(directory, start_step=start_step, enabled=writer)
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=f"layer {layer}", disable=not (progress and writer),
                        unit="step", dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def record(self, step: int, values: dict[str, float], *, lr: float, dead_frac: float,
               resampled: int | None) -> dict[str, float]:
        """The step's row (its metrics, lr, dead share, features resampled, speed); returns it."""
        with record_function("csae.log"):
            now = time.perf_counter()
            done = step + 1 - self.start_step
            last = {"step": step, **values, "lr": lr, "dead_frac": dead_frac,
                    "resampled": resampled if resampled is not None else 0,
                    "tokens_per_s": done * self.cfg.batch_size / max(now - self.t0, 1e-9), "elapsed_s": now - self.t0}
            self.log.write(last)
            self.bar.update(1)
            if step % 10 == 0 or step + 1 == self.end:
                self.bar.set_postfix_str(f"tok/s {last['tokens_per_s']:,.0f} recon {values['recon_loss']:.3g} "
                                         f"l1 {values['l1']:.3g} nce {values['info_nce']:.3g} div "
                                         f"{values['diversity']:.2g} L0 {values['l0']:.0f} fvu {values['fvu']:.3f}")
            return last

    def close(self) -> None:
        self.bar.close()
        self.log.close()


class MetricsLog:
    """Append-only CSV, one row per step (DVC plots it directly). On resume, rows of steps not covered
    by the checkpoint are dropped first, so the log matches the weights."""

    def __init__(self, directory: Path, *, start_step: int, enabled: bool) -> None:
        self.path = directory / METRICS_FILE
        self._fh: Any = None
        self._writer: csv.DictWriter | None = None
        if not enabled:
            return
        kept = [r for r in read_metrics(directory) if r["step"] < start_step] if start_step > 0 else []
        buffer = io.StringIO()
        if kept:
            self._writer = csv.DictWriter(buffer, fieldnames=list(kept[0]))
            self._writer.writeheader()
            self._writer.writerows({k: _fmt(v) for k, v in r.items()} for r in kept)
        atomic_write(self.path, lambda p: Path(p).write_text(buffer.getvalue()))
        self._fh = open(self.path, "a", newline="")  # kept open for the whole run
        if self._writer is not None:
            self._writer = csv.DictWriter(self._fh, fieldnames=list(kept[0]))

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        if self._writer is None:  # a fresh log: the first record's keys are the columns
            self._writer = csv.DictWriter(self._fh, fieldnames=list(record))
            self._writer.writeheader()
        self._writer.writerow({k: _fmt(v) for k, v in record.items()})

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fmt(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # repr: exact round trip
