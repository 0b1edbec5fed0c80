"""The sparse autoencoder module: parameters, encode/decode, save/load. No training logic here.

Saved in SAELens' on-disk format (`cfg.json` + `sae_weights.safetensors` with W_enc (d_in, d_sae),
b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)) so SAELens' `SAE.load_from_disk`, SAEBench and
Neuronpedia tools read our SAEs. A saved SAE takes raw activations: the input scaling used in training
is folded into the weights before saving (see `fold_input_scale`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from csae.shared.files import atomic_write, read_safetensors

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


class SAE(nn.Module):
    """ReLU SAE: f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec; W_dec rows unit norm."""

    def __init__(self, d_in: int, d_sae: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.reset_parameters_()

    @torch.no_grad()
    def reset_parameters_(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; the encoder starts as the decoder's transpose (tied init)."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        self.W_dec.copy_(nn.functional.normalize(w, dim=1))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Feature activations f, shape (batch, d_sae)."""
        return torch.relu((x_BD - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat, shape (batch, d_in)."""
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_BF = self.encode(x_BD)
        return self.decode(f_BF), f_BF

    def _decoder_blocks(self) -> range:
        """Starts of blocks of decoder rows of ~1 MB: the row-wise updates below read and write each block
        while it is in cache, one pass over W_dec from memory instead of one per operation (same results).
        Measured at d 640 x 2,560 on 2 cores (1 MB of L2 each), from a cold cache: the projection takes
        0.66 ms in 1 MB blocks, 0.85 in 256 KB ones (more small ops) and 0.85 unblocked; the renormalisation
        0.39, 0.59 and 0.30."""
        return range(0, self.d_sae, max(1, (1 << 20) // (self.d_in * self.W_dec.element_size())))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self) -> None:
        blocks = self._decoder_blocks()
        for i in blocks:
            w = self.W_dec[i: i + blocks.step]
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """Project out of each decoder row's gradient its component along that row, so a step moves the
        row along the unit sphere instead of changing its norm (which renormalising would undo):
        g_i -= (g_i . w_i) w_i, in place (training calls it every step). The rows must be unit norm, as
        training keeps them (set_decoder_norm_to_unit_norm_ after every change; as SAELens' projection)."""
        if self.W_dec.grad is None:
            return
        blocks = self._decoder_blocks()
        for i in blocks:
            g, w = self.W_dec.grad[i: i + blocks.step], self.W_dec[i: i + blocks.step]
            g.addcmul_(w, torch.linalg.vecdot(g, w).unsqueeze(1).to(g.dtype), value=-1.0)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> SAE:
        """A copy that takes raw x, given that this SAE was trained on scale * x.

        With f' = ReLU((s x - b_dec) W_enc + b_enc), the copy computes f = f' / s and x_hat = x_hat' / s:
        b_enc and b_dec are divided by s; W_enc and the unit-norm W_dec are unchanged.
        """
        out = SAE(self.d_in, self.d_sae, dtype=torch.float32)
        out.load_state_dict({k: v.detach().float() for k, v in self.state_dict().items()})
        out.b_enc.div_(scale)
        out.b_dec.div_(scale)
        return out

    def save(self, directory: str | Path, *, metadata: dict[str, Any] | None = None) -> None:
        """Write cfg.json + sae_weights.safetensors (SAELens layout), each file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p),
                     need=sum(t.numel() * 4 for t in tensors.values()))
        cfg = saelens_cfg(self.d_in, self.d_sae, metadata or {})
        atomic_write(directory / CFG_FILE, lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> SAE:
        directory = Path(directory)
        tensors, _ = read_safetensors(directory / WEIGHTS_FILE)
        d_in, d_sae = tensors["W_enc"].shape
        sae = cls(int(d_in), int(d_sae), device=device)
        sae.load_state_dict(tensors)
        return sae


def saelens_cfg(d_in: int, d_sae: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """The cfg.json SAELens 6.x reads for a standard (ReLU) SAE; our own details go in `metadata`."""
    return {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": metadata}
