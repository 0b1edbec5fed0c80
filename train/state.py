"""Training's resumable state in a layer directory.

    layer_<L>/state.pt       resumable training state (scaled units, optimiser, step); removed when the layer
                             completes, since the deliverables (see csae.shared.sae.checkpoint) are then written
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from csae.shared.errors import UserError
from csae.shared.files import atomic_write

STATE_FILE = "state.pt"
#: The resumable state's format; a state.pt of another format is refused with the fix.
STATE_FORMAT = 2


def all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def save_state(directory: Path, state: dict[str, Any]) -> None:
    state = {**state, "format": STATE_FORMAT}
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
    except Exception as err:  # torch.load raises many types for a truncated or foreign file
        raise UserError(f"cannot resume from {path}: the file is damaged ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''}); delete it to restart that layer "
                        f"from step 0 with --resume, or replace the run with --overwrite") from None
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"cannot resume from {path}: it was written by another csae version (state format "
                        f"{state.get('format', 1)}, this csae resumes {STATE_FORMAT}); delete it to restart that layer "
                        f"from step 0 with --resume, or replace the run with --overwrite")
    return state
