"""Fast-dLLM's KV caches for masked diffusion models (LLaDA, Dream: `diffusion.attention == "full"`).

The uncached decode (rollout/decoder.py) runs every step as one forward of the whole canvas. Bidirectional
attention means every key changes whenever any token is revealed, so no cache is exact; Fast-dLLM's two caches
reuse keys and values that are slightly stale instead, refreshed at the start of every block:

  prefix  the block's first step is the uncached forward of the whole canvas, and writes the keys and values
          of the positions before the current block; its later steps feed only the current block and
          everything after it, attending to that cached prefix and to themselves.
  dual    the block's first step writes the keys and values of the whole canvas; its later steps feed only the
          current block, attending to the cached prefix, the cached suffix (the later blocks as they were at
          the block's first step) and themselves: the block's own stale keys are `replaced` (kv_cache.py).

What is exact: the first step of every block (the uncached forward of the same canvas), and so the whole decode
when every block takes one step. The rest is Fast-dLLM's approximation; the tests and benchmarks/rollout.py
measure how often it changes a token. Trajectories are those of the uncached loop: reveal step, and log-prob of
the forward that revealed each token.

Shifted prediction (Dream: the token at i is predicted by the output at i - 1): the later steps feed from one
position before the block, so that the block's first token is predicted by a fed position, not by a cached one;
the cache then keeps the positions before that one.
"""

from __future__ import annotations

import torch

from dare_mega.errors import ConfigError

MASKED_CACHES = ("none", "prefix", "dual")


def cache_setting(cache: bool, masked_cache: str, args) -> bool | str:
    """What a run passes as generate's `cache`: the block KV cache for block diffusion (exact); for masked
    diffusion, `masked_cache` (rollout.masked_cache) when `cache` (rollout.cache) is on."""
    if masked_cache not in MASKED_CACHES:
        raise ConfigError(f"rollout.masked_cache={masked_cache!r}; expected one of {', '.join(MASKED_CACHES)}")
    if not cache or args.diffusion.attention != "full":
        return bool(cache)
    return masked_cache


def cache_mode(cache, full: bool, architecture: str) -> str | None:
    """generate's `cache` -> None (uncached), "block", "prefix" or "dual". True means the family's default: the
    block KV cache for block diffusion, Fast-dLLM's prefix cache for masked diffusion (DARE's use_cache=True)."""
    if cache is None or cache is False or cache == "none":
        return None
    if cache is True:
        return "prefix" if full else "block"
    if cache not in MASKED_CACHES:
        raise ConfigError(f"generate: cache={cache!r}; expected True, False or one of {', '.join(MASKED_CACHES)}")
    if not full:
        raise ConfigError(f"generate: cache={cache!r} is a masked-diffusion cache (Fast-dLLM's); {architecture} is a "
                          "block diffusion model, whose block KV cache is exact: use cache=True")
    return cache


def _forward_plan(r, block: int, shift: int, kind: str):
    """(first fed position, end of the fed positions, cached positions read, replaced [start, stop), positions
    written, index of the block's first position among the fed ones) of request `r` at its current step."""
    length = r.canvas.numel()
    # later steps feed from `cut` (an empty prompt has no position before the block); the prefix cache keeps
    # the positions before it
    cut = max(r.block_start - shift, 0)
    if r.step == 0:  # the uncached forward of the whole canvas, refreshing the cache
        return 0, length, 0, (0, 0), (cut if kind == "prefix" else length), r.block_start
    if kind == "prefix":
        return cut, length, cut, (0, 0), 0, r.block_start - cut
    return cut, r.block_start + block, length, (cut, r.block_start + block), 0, r.block_start - cut


def cached_block_logits(decoder, cache, requests, slots: list[int], block: int, kind: str) -> torch.Tensor:
    """One forward for `requests` (request j in cache row slots[j]), each at its current block and step, with
    the `kind` of cache: float32 logits [B, block, vocab] of each request's current block, on the CPU."""
    shift = 1 if decoder.args.diffusion.shifted_logits else 0
    plans = [_forward_plan(r, block, shift, kind) for r in requests]
    width = max(end - start for start, end, *_ in plans)
    tokens = torch.zeros(len(requests), width, dtype=torch.long)
    positions = torch.zeros(len(requests), width, dtype=torch.long)
    fed = torch.zeros(len(requests), width, dtype=torch.bool)
    write = torch.zeros(len(requests), width, dtype=torch.bool)
    for j, (r, (start, end, _, _, written, _)) in enumerate(zip(requests, plans)):
        tokens[j, : end - start] = r.canvas[start:end]
        positions[j] = torch.arange(start, start + width)  # padding continues the positions; it writes nothing
        fed[j, : end - start] = True
        write[j, : end - start] = positions[j, : end - start] < written
    # bidirectional among each row's fed tokens; padding attends only to itself
    new_mask = (fed[:, :, None] & fed[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
    lengths = torch.tensor([p[2] for p in plans])
    replaced = torch.tensor([p[3] for p in plans]) if kind == "dual" else None
    starts = torch.tensor([p[5] for p in plans])
    return decoder._cached_forward(cache, slots, lengths, tokens, positions, new_mask, write, logits=True,
                                   starts=starts, width=block, replaced=replaced)


def run_masked_cached(decoder, requests, block: int, steps: int, stop_ids, params, kind: str) -> None:
    """The uncached masked-diffusion loop of `decoder` (a BlockDecoder: the per-request state, unmasking and stop
    rules) with Fast-dLLM's `kind` of cache. All active requests share each forward, each at its own block and
    step."""
    from dare_mega.diffusion.kv_cache import BlockKVCache

    decoder._block = block
    mask_id = decoder.args.diffusion.mask_token_id
    # one row per request and a spare one for the padding rows of backends that pad
    cache = BlockKVCache(len(requests) + 1, max(r.canvas.numel() for r in requests))
    for r in requests:
        decoder._start_block(r, len(r.prompt), mask_id)
    active = list(range(len(requests)))
    while decoder._another_forward(bool(active)):
        if not active:
            decoder._idle_forward(block)
            continue
        rows = [requests[i] for i in active]
        logits = cached_block_logits(decoder, cache, rows, active, block, kind)
        decoder.stats["forwards"] += 1
        for j, r in enumerate(rows):
            r.forwards += 1
            decoder._denoise(r, logits[j], r.canvas[r.block_start : r.block_start + block], steps, params, mask_id)
            if not (r.canvas[r.block_start : r.block_start + block] == mask_id).any():
                decoder._check_stop(r, block, stop_ids, params)
                if not r.done:
                    decoder._start_block(r, r.block_start + block, mask_id)
        active = [i for i in active if not requests[i].done]
