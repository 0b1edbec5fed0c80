"""Decoder geometry for the browser: each feature's direct logit effect, its nearest features by decoder cosine
and its best match in another run's dictionary.

Logit effect of feature f: W_U (g * d_f), with d_f its unit decoder direction, g the final norm's elementwise
gain and W_U the unembedding. For an RMS norm, norm(h + a d_f) moves the final state along g * d_f up to the
norm's per-token scale (a positive factor), so this ranks the tokens whose logits the feature raises and
lowers when written into the last residual; it ignores the blocks after layer L and the logit soft-cap (a
monotone map). Shape suffixes: F features, D model width, V vocabulary, K listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from csae.shared.errors import UserError
from csae.shared.lm.models import base_model

#: Features per unembedding product (memory: chunk x vocabulary floats).
FEATURE_CHUNK = 256


def final_norm(model: Any) -> torch.nn.Module:
    """The norm applied to the last residual before the unembedding."""
    base = base_model(model)
    for name in ("norm", "ln_f", "final_layernorm", "final_norm"):
        found = getattr(base, name, None)
        if isinstance(found, torch.nn.Module):
            return found
    raise UserError(f"cannot find the final norm of {type(model).__name__} (looked for norm, ln_f, final_layernorm);"
                    f" the browser's logit effects support decoder LMs with one of those")


@torch.inference_mode()
def norm_gain(model: Any) -> torch.Tensor:
    """g (D,) float32: the final norm's elementwise gain. For an RMS norm it is the norm of a vector of ones
    (rms 1), whatever the convention of its weight (Gemma stores gain - 1); a LayerNorm's is its weight."""
    norm = final_norm(model)
    param = next(norm.parameters())
    if isinstance(norm, torch.nn.LayerNorm):
        return param.detach().float().cpu()
    ones = torch.ones(1, param.shape[0], dtype=param.dtype, device=param.device)
    return norm(ones)[0].detach().float().cpu()


@dataclass
class LogitEffects:
    up_ids_FK: torch.Tensor
    up_FK: torch.Tensor
    down_ids_FK: torch.Tensor
    down_FK: torch.Tensor
    """Most negative first."""


@torch.inference_mode()
def logit_effects(w_dec_FD: torch.Tensor, gain_D: torch.Tensor, w_u_VD: torch.Tensor, k: int,
                  dtype: torch.dtype) -> LogitEffects:
    """The k tokens each feature's logit effect W_U (g * d_f) raises most and lowers most."""
    d_FD = torch.nn.functional.normalize(w_dec_FD.float(), dim=1) * gain_D
    w_u = w_u_VD.to(dtype)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for s in range(0, len(d_FD), FEATURE_CHUNK):
        logits = (d_FD[s:s + FEATURE_CHUNK].to(w_u.device, dtype) @ w_u.T).float().cpu()
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        for i, t in enumerate((up.indices, up.values, down.indices, down.values)):
            parts[i].append(t)
    return LogitEffects(*(torch.cat(p) for p in parts))


@torch.inference_mode()
def nearest(w_dec_FD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (F, k), cosines) of each feature's k nearest other features by decoder cosine."""
    d = torch.nn.functional.normalize(w_dec_FD.float(), dim=1)
    k = min(k, len(d) - 1)
    ids, cos = [], []
    for s in range(0, len(d), 1024):
        sim = d[s:s + 1024] @ d.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2.0  # not itself
        top = sim.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return torch.cat(ids), torch.cat(cos)


@torch.inference_mode()
def best_match(w_dec_FD: torch.Tensor, other_GD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(id, cosine) of each feature's most similar decoder direction in another dictionary."""
    a = torch.nn.functional.normalize(w_dec_FD.float(), dim=1)
    b = torch.nn.functional.normalize(other_GD.float(), dim=1)
    found = [(a[s:s + 1024] @ b.T).max(dim=1) for s in range(0, len(a), 1024)]
    return torch.cat([m.indices for m in found]), torch.cat([m.values for m in found])
