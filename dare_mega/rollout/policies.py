"""Sampling a token for every position of a block, and choosing which masked positions to reveal.

Sampling draws one uniform number per block position at every denoising step, whatever is masked, from a
generator of the block's own: seeded by (request seed, block index on the grid from position 0)
(`block_generator`). So a block's randomness depends only on the request's seed and the block itself, not on
how many steps earlier blocks took: the cached and uncached engines, any batch composition, SGLang's block loop
(rollout/sglang_algorithm.py) and the trainer's replay of a trajectory (rollout/replay.py), which decodes every
block at once, all draw the same numbers.
"""

from __future__ import annotations

import hashlib

import torch

from dare_mega.rollout.types import SamplingParams


def block_generator(seed: int | None, block_index: int) -> torch.Generator | None:
    """The generator of block `block_index` of the request seeded `seed` (None: the global generator)."""
    if seed is None:
        return None
    key = f"{int(seed)}/{int(block_index)}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)


def likelihood_log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log softmax(logits / T) over the full vocabulary [T, V]: what a rollout records for a revealed token and
    the trainer recomputes (T: logprob_temperature, else the sampling temperature, 1 when greedy)."""
    temperature = params.temperature if params.temperature > 0 else 1.0
    return torch.log_softmax(logits / (params.logprob_temperature or temperature), dim=-1)


def sample_block(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 never: int | None = None):
    """logits [T, V] float32 -> tokens [T], confidence [T] (probability of the token under the filtered
    distribution), logprob [T] (log softmax(logits / T) of the token, untruncated; T = logprob_temperature
    when set), entropy [T].

    `never` (the mask id) is never sampled: revealing a mask would leave the position masked."""
    temperature = params.temperature if params.temperature > 0 else 1.0
    scaled = logits / temperature
    log_probs = likelihood_log_probs(logits, params)
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
    if params.policy in ("low_confidence_static", "random_static"):  # random: `confidence` holds uniforms
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
    if params.policy == "random_static":  # LLaDA's remasking="random": which positions, uniformly at random
        confidence = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    return choose_reveals(masked, confidence, entropy, step, steps, initially_masked, params), tokens, logprob
