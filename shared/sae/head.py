"""The contrastive head h: R^d_sae -> R^c that InfoNCE is computed on (saved beside the SAE)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from csae.shared.files import atomic_write, read_safetensors

HEAD_FILE = "head.safetensors"


class ContrastiveHead(nn.Module):
    """z = W2 ReLU(W1 f + b1) + b2 with a hidden layer, or z = W1 f + b1 without (hidden = 0)."""

    def __init__(self, d_sae: int, d_out: int, hidden: int = 0) -> None:
        super().__init__()
        self.d_sae, self.d_out, self.hidden = d_sae, d_out, hidden
        self.first = nn.Linear(d_sae, hidden or d_out)
        self.second = nn.Linear(hidden, d_out) if hidden else None

    def forward(self, f_BF: torch.Tensor) -> torch.Tensor:
        z = self.first(f_BF)
        return self.second(torch.relu(z)) if self.second is not None else z

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> ContrastiveHead:
        """A copy taking raw-unit features f / scale (what the folded SAE outputs): h'(f) = h(scale f)."""
        out = ContrastiveHead(self.d_sae, self.d_out, self.hidden)
        out.load_state_dict({k: v.detach().float().cpu() for k, v in self.state_dict().items()})
        out.first.weight.mul_(scale)
        return out

    def save(self, directory: str | Path) -> None:
        """The weights only: the sizes are their shapes. (No safetensors metadata: its writer orders the keys
        of a metadata dict differently from run to run, so two identical heads would differ byte for byte.)"""
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        atomic_write(Path(directory) / HEAD_FILE, lambda p: save_file(tensors, p),
                     need=sum(t.numel() * 4 for t in tensors.values()))

    @classmethod
    def load(cls, directory: str | Path) -> ContrastiveHead:
        tensors, _ = read_safetensors(Path(directory) / HEAD_FILE)
        width, d_sae = tensors["first.weight"].shape
        second = tensors.get("second.weight")
        head = cls(d_sae, width, 0) if second is None else cls(d_sae, second.shape[0], width)
        head.load_state_dict(tensors)
        return head
