"""The HF reference of SDAR: transformers' Qwen3 / Qwen3-MoE classes with the SDAR checkpoint's weights.

SDAR's own modeling files (trust_remote_code) differ from Qwen3 only in how masks and caches are built;
given the same explicit 4-D mask and position ids, the arithmetic is Qwen3's. Used by tools/check_logits.py
and the parity tests.
"""

from __future__ import annotations

import torch

from dare_mega.models.builder import read_hf_config
from dare_mega.models.sdar.config import DENSE_ARCH, MOE_ARCH


def hf_reference_model(directory: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg, source = read_hf_config(directory)
    arch = cfg["architectures"][0]
    keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type", "auto_map")}
    if arch == DENSE_ARCH:
        config, cls = Qwen3Config(**keep), Qwen3ForCausalLM
    elif arch == MOE_ARCH:
        config, cls = Qwen3MoeConfig(**keep), Qwen3MoeForCausalLM
    else:
        raise ValueError(f"{source}: {arch!r} is not an SDAR architecture")
    from dare_mega.models.reference import from_pretrained_checked

    # from_pretrained applies transformers' own conversion of per-expert tensors into its fused layout
    return from_pretrained_checked(cls, directory, config, dtype, attn_implementation)


def hf_named_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """The reference's parameters (or their gradients) under the checkpoint's tensor names.

    transformers stores MoE experts fused ([E, 2*ffn, hidden] gate_up_proj = [gate ; up] per expert,
    [E, hidden, ffn] down_proj); they are split back into the per-expert names of the published checkpoints.
    """
    out = {}
    for name, param in model.named_parameters():
        value = param.grad if grads else param.detach()
        if value is None:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[name] = value
    return out
