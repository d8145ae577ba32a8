"""Activation recomputation (RuntimeOptions.recompute_granularity), applied to built chunks by composition.

full       each transformer layer keeps only its input; its forward runs again in the backward
selective  each layer's core attention (the [heads, s, s] scores and probabilities of the block-diffusion mask)
           is recomputed; the rest of the layer keeps its activations

Megatron's own recompute (TransformerConfig.recompute_granularity) cannot carry our attention masks: its
CheckpointFunction saves every argument with `save_for_backward`, which takes tensors only, and the two-stream
masks (diffusion/masks.py) are structured objects. PyTorch's non-reentrant checkpoint takes any argument, gives
the same numbers (the recomputation runs the same kernels on the same inputs; there is no dropout to replay),
and only applies when gradients are recorded: rollout forwards (no grad, KV-cache writes) run once.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

GRANULARITIES = ("full", "selective")


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_recompute(model, granularity: str | None) -> None:
    """Wrap the forwards of `model`'s decoder layers (full) or core attentions (selective) in place."""
    if granularity is None:
        return
    if granularity not in GRANULARITIES:
        raise ValueError(f"recompute_granularity={granularity!r}: expected one of {GRANULARITIES} or None")
    for layer in model.decoder.layers:
        target = layer if granularity == "full" else layer.self_attention.core_attention
        target.forward = _recomputed(target.forward)
