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

from dare_mega.rollout.types import DREAM_POLICIES, SamplingParams


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


def step_uniforms(generator: torch.Generator | None, width: int, params: SamplingParams) -> dict[str, torch.Tensor]:
    """The uniform numbers one denoising step of a block draws from its generator, in the order it draws them:
    one per position for the token (float64 when sampling; float32 and unused at temperature 0, so that the
    count per step stays fixed) and, for `random_static`, one per position for the order of reveals. The
    device loop (rollout/device_loop.py) draws a whole request's numbers up front with this same function."""
    sampled = params.temperature > 0
    if sampled or generator is not None:
        out = {"token": torch.rand(width, generator=generator, dtype=torch.float64 if sampled else torch.float32)}
    else:  # greedy on the global generator: nothing to keep in step with
        out = {"token": torch.zeros(width, dtype=torch.float32)}
    if params.policy == "random_static":
        out["position"] = torch.rand(width, generator=generator, dtype=torch.float64)
    return out


def sample_block(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 never: int | None = None):
    """logits [T, V] float32 -> tokens [T], confidence [T] (probability of the token under the filtered
    distribution), logprob [T] (log softmax(logits / T) of the token, untruncated; T = logprob_temperature
    when set), entropy [T]: `sample_with_uniforms` on this step's numbers from `generator`."""
    return sample_with_uniforms(logits, params, step_uniforms(generator, logits.shape[0], params)["token"], never)


def sample_with_uniforms(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor,
                         never: int | None = None):
    """`sample_block` on any number of rows [N, V] with one given uniform per row [N] (inverse CDF).

    `never` (the mask id) is never sampled: revealing a mask would leave the position masked. With
    `params.confidence == "raw"` the confidence is the token's probability under softmax(logits) over the whole
    vocabulary, in float64, as LLaDA's generate ranks its low-confidence remasking."""
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
    else:
        probs = torch.softmax(_top_p(_top_k(scaled, params.top_k), params.top_p), dim=-1)
        tokens = _inverse_cdf(probs, uniforms)
        confidence = probs.gather(-1, tokens[:, None])[:, 0]
    if params.confidence == "raw":
        confidence = torch.softmax(logits.double(), dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, confidence, log_probs.gather(-1, tokens[:, None])[:, 0], entropy


def _top_k(scaled: torch.Tensor, top_k: int) -> torch.Tensor:
    if not top_k:
        return scaled
    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _top_p(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token crossing top_p
    return scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverse CDF from one uniform per row."""
    return _inverse_cdf(probs, torch.rand(probs.shape[0], generator=generator, dtype=torch.float64))


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(-1)
    draws = uniforms.to(device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]


def choose_reveals(masked: torch.Tensor, confidence: torch.Tensor, entropy: torch.Tensor, step: int,
                   steps: int, initially_masked: int, params: SamplingParams) -> torch.Tensor:
    """Which masked positions of one block to reveal at this step (bool [T]): `choose_reveals_rows` on one row.

    The last allowed step reveals everything left, so a block takes at most `steps` denoising forwards.
    """
    step_t = torch.tensor([step], device=masked.device)
    initial = torch.tensor([initially_masked], device=masked.device)
    return choose_reveals_rows(masked[None], confidence[None], entropy[None], step_t, steps, initial, params)[0]


def choose_reveals_rows(masked: torch.Tensor, confidence: torch.Tensor, entropy: torch.Tensor, step: torch.Tensor,
                        steps: int, initially_masked: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`choose_reveals` for rows of blocks at once, in tensor operations only (no value read on the host):
    masked / confidence / entropy [R, T], step / initially_masked [R] -> reveal bool [R, T].

    low_confidence_static, random_static: initially_masked / steps positions per step (the remainder spread
    over the first steps), the most confident first (random_static: `confidence` holds uniforms);
    low_confidence_dynamic: every masked position above the threshold, else the most confident one;
    entropy_bounded: the most certain positions while their entropies sum below the bound (at least one).
    Equal scores go to the lower position."""
    remaining = masked.sum(-1)
    above = torch.zeros_like(masked)  # revealed whatever the count (the dynamic policy's confident ones)
    if params.policy in ("low_confidence_static", "random_static"):
        quota = initially_masked // steps + (step < initially_masked % steps).long()
        count = torch.minimum(quota, remaining)
        scores = confidence
    elif params.policy == "low_confidence_dynamic":
        above = masked & (confidence > params.threshold)
        count = torch.where(above.any(-1), 0, 1)
        scores = confidence
    else:  # entropy_bounded
        by_entropy = entropy.masked_fill(~masked, float("inf")).sort(dim=-1, stable=True).values
        within = (by_entropy.cumsum(-1) < params.entropy_bound) & (torch.arange(masked.shape[-1], device=masked.device)
                                                                    < remaining[:, None])
        count = within.sum(-1).clamp(min=1)
        scores = -entropy
    # the rank of each masked position by score (descending; ties to the lower position), then the first `count`
    order = scores.masked_fill(~masked, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(masked.shape[-1], device=masked.device)
                                            .expand_as(order).contiguous())
    chosen = masked & ((rank < count[:, None]) | above)
    last = (step >= steps - 1)[:, None]
    return torch.where(last, masked, chosen)


def denoise_step(logits: torch.Tensor, block_tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None,
                 step: int, steps: int, initially_masked: int, params: SamplingParams, prompt: torch.Tensor | None = None):
    """One denoising step of one block (the native engine's and the SGLang algorithm's, one function):
    logits [T, V], block_tokens [T] -> (reveal bool [T], tokens [T], logprob [T]). `prompt` (bool [T]) marks
    prompt positions that hold the mask id literally: never revealed."""
    masked = block_tokens == mask_id
    if prompt is not None:
        masked = masked & ~prompt
    if params.policy in DREAM_POLICIES:
        return dream_step(logits, masked, mask_id, generator, step, steps, params)
    uniforms = step_uniforms(generator, logits.shape[0], params)
    tokens, confidence, logprob, entropy = sample_with_uniforms(logits, params, uniforms["token"], never=mask_id)
    if params.policy == "random_static":  # LLaDA's remasking="random": which positions, uniformly at random
        confidence = uniforms["position"]
    return choose_reveals(masked, confidence, entropy, step, steps, initially_masked, params), tokens, logprob


# ---- Dream's diffusion_generate algorithms ----------------------------------------------------------------


def dream_sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 never: int | None = None):
    """Dream's sample_tokens: (tokens [T], confidence [T], logprob [T]). Temperature, then top-p, then top-k
    (Dream's order; the filters apply at temperature 0 too), then the token: drawn at T > 0, the most likely at
    T = 0 (one uniform per position drawn either way). Confidence: the token's probability (maskgit_plus,
    origin), the top-1 minus top-2 probability (topk_margin) or sum p log p, the negative entropy (entropy),
    all under the filtered distribution."""
    scaled = logits / params.temperature if params.temperature > 0 else logits.clone()
    if never is not None:
        scaled[:, never] = float("-inf")
    probs = torch.softmax(_top_k(_top_p(scaled, params.top_p), params.top_k), dim=-1)
    if params.temperature > 0:
        tokens = _draw(probs, generator)
        confidence = probs.gather(-1, tokens[:, None])[:, 0]
    else:
        torch.rand(logits.shape[0], generator=generator)  # the draw count stays fixed per step
        confidence, tokens = probs.max(dim=-1)
    if params.policy == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif params.policy == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    logprob = likelihood_log_probs(logits, params).gather(-1, tokens[:, None])[:, 0]
    return tokens, confidence, logprob


def dream_transfer_fraction(step: int, steps: int, eps: float) -> torch.Tensor:
    """1 - s / t on Dream's schedule (timesteps = linspace(1, eps, steps + 1) in float32, t = timesteps[step],
    s = timesteps[step + 1]): the expected fraction of the masked tokens revealed at this step."""
    timesteps = torch.linspace(1, eps, steps + 1)
    return 1 - timesteps[step + 1] / timesteps[step]


def dream_step(logits: torch.Tensor, masked: torch.Tensor, mask_id: int, generator: torch.Generator | None,
               step: int, steps: int, params: SamplingParams):
    """One step of Dream's generate on one block: (reveal bool [T], tokens [T], logprob [T]). The last step
    reveals every masked position. `origin`: each masked position independently with probability 1 - s / t
    (one uniform per position, drawn after the tokens'). The others: int(n_masked * (1 - s / t)) positions (in
    float32, as Dream counts), the most confident, or, with alg_temp > 0, drawn without replacement from
    softmax(confidence / alg_temp) over the masked positions."""
    tokens, confidence, logprob = dream_sample(logits, params, generator, never=mask_id)
    last = step >= steps - 1
    if params.policy == "origin":
        draws = torch.rand(logits.shape[0], generator=generator).to(masked.device)
        reveal = masked.clone() if last else masked & (draws < dream_transfer_fraction(step, steps, params.eps))
        return reveal, tokens, logprob
    remaining = int(masked.sum())
    count = remaining if last else int(torch.tensor(float(remaining)) * dream_transfer_fraction(step, steps,
                                                                                                 params.eps))
    reveal = torch.zeros_like(masked)
    if count == 0:
        return reveal, tokens, logprob
    scores = confidence.masked_fill(~masked, float("-inf"))
    if params.alg_temp > 0:
        chosen = torch.multinomial(torch.softmax(scores / params.alg_temp, dim=-1), count, generator=generator)
    else:
        chosen = scores.topk(count).indices
    reveal[chosen] = True
    return reveal, tokens, logprob
