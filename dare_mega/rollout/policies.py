"""Sampling a token for every position of a block, and choosing which masked positions to reveal.

Sampling draws one uniform number per block position from the request's own generator at every denoising
step, whatever is masked, so that a request's randomness depends only on its seed and its own trajectory
(the cached and uncached engines, and any batch composition, reproduce each other exactly).
"""

from __future__ import annotations

import torch

from dare_mega.rollout.types import SamplingParams


def sample_block(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 never: int | None = None):
    """logits [T, V] float32 -> tokens [T], confidence [T] (probability of the token under the filtered
    distribution), logprob [T] (log softmax(logits / T) of the token, untruncated; T = logprob_temperature
    when set), entropy [T].

    `never` (the mask id) is never sampled: revealing a mask would leave the position masked."""
    temperature = params.temperature if params.temperature > 0 else 1.0
    scaled = logits / temperature
    # what the trainer recomputes: the full vocabulary, at the trainer's likelihood temperature
    likelihood = params.logprob_temperature or temperature
    log_probs = torch.log_softmax(scaled if likelihood == temperature else logits / likelihood, dim=-1)
    if never is not None:
        scaled = scaled.clone()
        scaled[:, never] = float("-inf")
    probs_full = torch.softmax(scaled, dim=-1)
    entropy = -(probs_full * torch.log(probs_full.clamp_min(1e-30))).sum(-1)
    if params.temperature == 0:
        tokens = scaled.argmax(-1)
        confidence = probs_full.gather(-1, tokens[:, None])[:, 0]
        if generator is not None:  # keep the draw count fixed per step, greedy or not
            torch.rand(logits.shape[0], generator=generator)
        return tokens, confidence, log_probs.gather(-1, tokens[:, None])[:, 0], entropy
    filtered = scaled
    if params.top_k:
        kth = filtered.topk(min(params.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = filtered.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > params.top_p  # keep the token crossing top_p
        filtered = filtered.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(filtered, dim=-1)
    draws = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64).to(probs.device)
    cdf = probs.double().cumsum(-1)
    tokens = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]
    confidence = probs.gather(-1, tokens[:, None])[:, 0]
    return tokens, confidence, log_probs.gather(-1, tokens[:, None])[:, 0], entropy


def choose_reveals(masked: torch.Tensor, confidence: torch.Tensor, entropy: torch.Tensor, step: int,
                   steps: int, initially_masked: int, params: SamplingParams) -> torch.Tensor:
    """Which masked positions of one block to reveal at this step (bool [T]).

    The last allowed step reveals everything left, so a block takes at most `steps` denoising forwards.
    """
    remaining = int(masked.sum())
    if remaining == 0:
        return torch.zeros_like(masked)
    if step >= steps - 1:
        return masked.clone()
    if params.policy == "low_confidence_static":
        quota = initially_masked // steps + (1 if step < initially_masked % steps else 0)
        count = min(quota, remaining)
    elif params.policy == "low_confidence_dynamic":
        above = masked & (confidence > params.threshold)
        if above.any():
            return above
        count = 1
    else:  # entropy_bounded: the most certain tokens, while their entropies sum below the bound
        order_entropy = entropy.masked_fill(~masked, float("inf"))
        sorted_entropy, _ = order_entropy.sort()
        cumulative = sorted_entropy[:remaining].cumsum(0)
        count = max(1, int((cumulative < params.entropy_bound).sum()))
        chosen = torch.zeros_like(masked)
        chosen[order_entropy.argsort()[:count]] = True
        return chosen
    chosen = torch.zeros_like(masked)
    if count:
        chosen[confidence.masked_fill(~masked, float("-inf")).topk(count).indices] = True
    return chosen


def denoise_step(logits: torch.Tensor, block_tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None,
                 step: int, steps: int, initially_masked: int, params: SamplingParams, prompt: torch.Tensor | None = None):
    """One denoising step of one block (the native engine's and the SGLang algorithm's, one function):
    logits [T, V], block_tokens [T] -> (reveal bool [T], tokens [T], logprob [T]). `prompt` (bool [T]) marks
    prompt positions that hold the mask id literally: never revealed."""
    masked = block_tokens == mask_id
    if prompt is not None:
        masked = masked & ~prompt
    tokens, confidence, logprob, entropy = sample_block(logits, params, generator, never=mask_id)
    return choose_reveals(masked, confidence, entropy, step, steps, initially_masked, params), tokens, logprob
