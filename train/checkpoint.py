"""Training's own files in a layer directory: the resumable state and the per-step metrics log.

    layer_<L>/state.pt       resumable training state (scaled units, optimiser, step); removed when the layer
                             completes, since the deliverables (see csae.shared.checkpoint) are then written
    layer_<L>/metrics.csv    one row per step, appended as training goes
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from csae.shared.checkpoint import METRICS_FILE, read_metrics
from csae.shared.errors import UserError
from csae.shared.files import atomic_write

STATE_FILE = "state.pt"


def all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def save_state(directory: Path, state: dict[str, Any]) -> None:
    atomic_write(directory / STATE_FILE, lambda p: torch.save(state, p), need=_nbytes(state))


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state dict (about what torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def load_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a training state")
        return state
    except Exception as err:  # torch.load raises many types for a truncated or foreign file
        raise UserError(f"cannot resume from {path}: the file is damaged ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''}); delete it to restart that layer "
                        f"from step 0 with --resume, or replace the run with --overwrite") from None


def join_optimiser_states(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two one-group optimiser state dicts (the SAE's, then the head's, as checkpoints held them for a while)
    as the one-group state of an optimiser over both parameter lists: the same tensors and step counts, so
    a run resumed from such a checkpoint continues exactly where it stopped."""
    (group,), (other,) = first["param_groups"], second["param_groups"]
    n = len(group["params"])
    state = first["state"] | {n + i: s for i, s in second["state"].items()}
    return {"state": state, "param_groups": [{**group, "params": list(range(n + len(other["params"])))}]}


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
