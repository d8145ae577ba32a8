"""The HF reference of Dream-7B: transformers' Qwen2ForCausalLM with the checkpoint's weights, its logits
shifted as Dream shifts them (models/ops.py: shift_logits).

Dream's own modeling_dream.py is Qwen2 with the causal mask removed (every attention call is non-causal);
given the same explicit 4-D mask and position ids, the arithmetic is transformers' Qwen2. DreamModel returns
unshifted logits and its generate / training code shifts them; the reference returns what dare_mega's models
return, the shifted ones (`raw_logits` keeps Qwen2's, for the test that the shift is there).
"""

from __future__ import annotations

import torch

from dare_mega.models import ops
from dare_mega.models.builder import read_hf_config


def reference_model(directory: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dare_mega.models.reference import from_pretrained_checked

    class DreamReference(Qwen2ForCausalLM):
        def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kwargs):
            out = super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                  **kwargs)
            out.raw_logits = out.logits
            out.logits = ops.shift_logits(out.logits, position_ids)
            return out

    cfg, source = read_hf_config(directory)
    keep = {k: v for k, v in cfg.items()
            if not k.startswith("_") and k not in ("architectures", "model_type", "auto_map", "attn_implementation")}
    return from_pretrained_checked(DreamReference, directory, Qwen2Config(**keep), dtype, attn_implementation)
