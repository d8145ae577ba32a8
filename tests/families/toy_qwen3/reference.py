"""The toy family's reference: transformers' Qwen3ForCausalLM with the checkpoint's weights."""

from __future__ import annotations

import json
import os


def reference_model(directory: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    config = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    model, info = Qwen3ForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32,
                                                   output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise ValueError(f"{directory}: the reference did not load cleanly: {info}")
    return model.eval()
