"""The baseline rollout loop of the speed benchmark: block-diffusion decoding on transformers' own model with its
KV cache, as SDAR's generate (and DARE's HF rollouts) decode: prefill the prompt's full blocks, then per block
denoising forwards of the block over the cache (the cache cropped back after each), greedy tokens, every masked
position above the threshold revealed (else the most confident one, all on the last step), and a last forward
that keeps the finished block's keys. The whole batch moves block by block (equal prompt lengths).

Used by benchmarks/rollout.py --speed; not part of the package.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_block_decode(model, prompts: torch.Tensor, new_tokens: int, block: int, threshold: float, mask_id: int,
                    steps: int | None = None) -> tuple[torch.Tensor, int]:
    """(canvas [B, prompt + new, rounded to blocks], forwards) for equal-length `prompts` [B, P]."""
    from transformers import DynamicCache

    steps = steps or block
    batch, prompt_len = prompts.shape
    device = next(model.parameters()).device
    total = -(-(prompt_len + new_tokens) // block) * block
    canvas = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    canvas[:, :prompt_len] = prompts.to(device)
    cache = DynamicCache(config=model.config)
    start = prompt_len // block * block
    forwards = 0
    if start:
        blocks = torch.arange(start, device=device) // block
        causal = (blocks[None, :] <= blocks[:, None])[None, None].expand(batch, 1, start, start)
        model(input_ids=canvas[:, :start], position_ids=torch.arange(start, device=device).expand(batch, -1),
              attention_mask=causal, past_key_values=cache, use_cache=True)
        forwards += 1
    while start < total:
        positions = torch.arange(start, start + block, device=device).expand(batch, -1)
        sees_all = torch.ones(batch, 1, block, start + block, dtype=torch.bool, device=device)
        for step in range(steps):
            window = canvas[:, start : start + block]
            masked = window == mask_id
            if not bool(masked.any()):  # the host looks at every step, as SDAR's generate does
                break
            logits = model(input_ids=window, position_ids=positions, attention_mask=sees_all, past_key_values=cache,
                           use_cache=True).logits.float()
            cache.crop(-block)  # drop this step's keys (transformers 5: a negative count removes)
            forwards += 1
            logits[..., mask_id] = float("-inf")
            confidence, tokens = torch.softmax(logits, dim=-1).max(-1)
            confidence = confidence.masked_fill(~masked, -1.0)
            reveal = masked & (confidence > threshold)
            top = torch.zeros_like(masked).scatter_(1, confidence.argmax(1, keepdim=True), True) & masked
            reveal = torch.where(reveal.any(1, keepdim=True), reveal, top)
            if step == steps - 1:
                reveal = masked
            canvas[:, start : start + block] = torch.where(reveal, tokens, window)
        model(input_ids=canvas[:, start : start + block], position_ids=positions, attention_mask=sees_all,
              past_key_values=cache, use_cache=True)  # the finished block's keys stay
        forwards += 1
        start += block
    return canvas, forwards
