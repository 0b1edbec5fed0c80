"""Read the residual stream after chosen blocks with one truncated forward.

Layer L is the output of block L (0-based), i.e. TransformerLens' `blocks.L.hook_resid_post`. The
forward stops inside the deepest requested block's hook, so later blocks and the LM head (262k logits
for Gemma 3, most of the full model's cost) never run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from csae.shared.lm.models import base_model, blocks


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward early."""


def block_output(output: object) -> torch.Tensor:
    """The hidden state a block's forward returned (blocks return a tensor or a tuple led by it)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value,index]


@torch.inference_mode()
def resid_post(model: object, input_ids_BT: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """{layer: residual stream after that block, shape (batch, tokens, d_model)}.

    No attention mask: sequences are right-padded and attention is causal, so a real token never
    attends to the padding after it, and the padded rows are dropped by the caller.
    """
    out: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    stack = blocks(model)

    def capture(layer: int):
        def hook(_module: object, _inputs: object, output: object) -> None:
            out[layer] = block_output(output)
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [stack[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        base_model(model)(input_ids=input_ids_BT, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out
