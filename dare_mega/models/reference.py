"""The single-process HF reference of any family, behind one interface (parity checks, tools, tests)."""

from __future__ import annotations

import torch

from dare_mega.models.builder import load_model_args, read_hf_config
from dare_mega.models.family import family_for, require_features


def reference_model(directory: str):
    cfg, source = read_hf_config(directory)
    family = family_for((cfg.get("architectures") or [None])[0], source)
    require_features(load_model_args(directory), family.reference_features, f"the {family.name} reference")
    model = family.reference(directory)
    model.dare_family = family
    return model


def from_pretrained_checked(cls, directory: str, config, dtype: torch.dtype, attn_implementation: str = "eager"):
    """A transformers reference class loaded from `directory` with `config`, refused unless every tensor
    loaded (nothing missing, unexpected or mis-shaped)."""
    config._attn_implementation = attn_implementation
    model, info = cls.from_pretrained(directory, config=config, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"{directory}: the transformers reference did not load cleanly: {problems}")
    return model.eval()


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [b, 1, s, s] (True = may attend) -> additive (0 / dtype minimum), as HF models take it."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed.bool(), torch.finfo(dtype).min)


def reference_forward(model, input_ids, position_ids, allowed) -> torch.Tensor:
    """Float32 logits under an explicit boolean mask (gradients flow; wrap in no_grad to skip them)."""
    dtype = next(model.parameters()).dtype
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=additive_mask(allowed, dtype))
    return out.logits.float()


def reference_logits(model, input_ids, position_ids, allowed) -> torch.Tensor:
    with torch.no_grad():
        return reference_forward(model, input_ids, position_ids, allowed)


def reference_named_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients) under the checkpoint's names: the family's own mapping of them, or, for
    the plain-PyTorch references (their module names are the checkpoint's), the module's names."""
    own = model.dare_family.reference_named_tensors
    if own is not None:
        return own(model, grads)
    out = {}
    for name, param in model.named_parameters():
        value = param.grad if grads else param.detach()
        if value is not None:
            out[name] = value
    return out
