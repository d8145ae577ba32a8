"""Megatron-Core GPTModel for diffusion LLMs: rotary phases from position ids, not from sequence length.

Megatron's GPTModel derives RoPE from 0..s-1 and ignores position_ids. Block-diffusion training lays out
[x_t ; x_0] with both copies at positions 0..n-1 (and packed samples restart at 0), so the phases must come
from the position ids. This subclass replaces only that: it gathers the rotary table by position,
giving Megatron's attention a [s, b, 1, rot_dim] tensor that it broadcasts over heads as usual.

For a model with shifted prediction (Dream: `shifted_logits=True`), the last stage returns the logits already
shifted (models/ops.py: shift_logits), so every consumer (losses, log-probs, decoding) reads the logits of
token i at position i, whatever the family.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from dare_mega.models.ops import shift_logits


def rotary_from_positions(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] positions -> [s, b, 1, rot_dim] rotary angles (rotate-half layout: [freqs ; freqs])."""
    freqs = position_ids.to(inv_freq.device, torch.float32)[..., None] * inv_freq.float()  # [b, s, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.transpose(0, 1).unsqueeze(2).contiguous()


class DiffusionGPTModel(GPTModel):
    def __init__(self, *args, shifted_logits: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.shifted_logits = shifted_logits

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        out = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if self.shifted_logits and self.post_process and kwargs.get("labels") is None:
            out = shift_logits(out, position_ids)  # [b, s, vocab / tp], the sequence whole on every TP rank
        return out

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        if self.position_embedding_type == "rope":
            if position_ids is None:
                raise ValueError("DiffusionGPTModel needs position_ids ([batch, seq]) for rotary embeddings")
            out[1] = rotary_from_positions(self.rotary_pos_emb.inv_freq, position_ids)
        return tuple(out)
