"""Fast-dLLM's acceleration of masked diffusion decoding (LLaDA, Dream): the prefix and dual KV caches
(rollout/masked_cache.py) and confidence-threshold parallel decoding (`low_confidence_dynamic`).

The caches are approximate (cached keys go stale as a block fills), so exactness is tested where it holds: a
block decoded in one step, and any step whose canvas has not changed since the cache was written (the later
steps then see exactly the keys of the uncached forward, which checks the fed windows, the prefix length, the
dual cache's replaced block and Dream's shifted first token). Elsewhere the agreement with the uncached decode
is measured (docs/algorithms.md, benchmarks/rollout.py)."""

from __future__ import annotations

import pytest
import torch

from dare_mega.checkpoint.tiny import cached_tiny_checkpoint
from dare_mega.diffusion.kv_cache import BlockKVCache
from dare_mega.errors import ConfigError
from dare_mega.rollout.decoder import _Request
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.masked_cache import cache_setting, cached_block_logits
from dare_mega.rollout.policies import choose_reveals
from dare_mega.rollout.types import SamplingParams

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [40]]
FAMILIES = ("tiny-llada", "tiny-dream")


@pytest.fixture(scope="module")
def engines():
    return {preset: NativeEngine.from_pretrained(cached_tiny_checkpoint(preset), tokenizer=False)
            for preset in FAMILIES}


@pytest.mark.parametrize("kind", ["prefix", "dual"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_blocks_decoded_in_one_step_are_exact(engines, preset, kind):
    """Every forward is then a block's first: the uncached forward of the whole canvas. Sampled, with stops."""
    engine = engines[preset]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, steps=1, seeds=(3, 4, 5),
                            stop_token_ids=(17, 18, 19))
    uncached, cached = engine.generate(PROMPTS, params, cache=False), engine.generate(PROMPTS, params, cache=kind)
    for a, b in zip(cached, uncached):
        assert a.generated_ids == b.generated_ids and a.generated_logprobs == b.generated_logprobs
        assert a.completion_ids == b.completion_ids and a.finish_reason == b.finish_reason
        assert a.generated_reveal_steps == b.generated_reveal_steps and a.forwards == b.forwards


def partly_decoded(engine, seed: int) -> list[_Request]:
    """Requests of uneven prompts, each in another block with a few of its positions revealed: random tokens
    before the block, masks after it."""
    g = torch.Generator().manual_seed(seed)
    args = engine.args
    block, mask_id = args.diffusion.block_size, args.diffusion.mask_token_id
    requests = []
    for i, (prompt, blocks_done) in enumerate(zip(PROMPTS, (1, 0, 2))):
        start = len(prompt) + blocks_done * block
        canvas = torch.full((len(prompt) + 4 * block,), mask_id, dtype=torch.long)
        canvas[:start] = torch.randint(0, 250, (start,), generator=g)
        canvas[: len(prompt)] = torch.tensor(prompt)
        revealed = torch.randperm(block, generator=g)[:3]
        canvas[start + revealed] = torch.randint(0, 250, (3,), generator=g)
        r = _Request(i, prompt, canvas, canvas.numel(), seed=None)
        r.block_start = start
        requests.append(r)
    return requests


@pytest.mark.parametrize("kind", ["prefix", "dual"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_a_cached_step_on_an_unchanged_canvas_gives_the_uncached_logits(engines, preset, kind):
    """A block's first step (which writes the cache) and a later step on the same canvas (which reads it) give
    the block logits of the uncached forward (1e-5), batched over requests at different blocks. For Dream this
    needs the later step to feed from the position before the block (its first token is predicted there)."""
    engine = engines[preset]
    block = engine.args.diffusion.block_size
    requests = partly_decoded(engine, seed=0)
    tokens, positions, mask = engine._prefixes(requests, [r.canvas.numel() for r in requests], block)
    uncached = engine._block_logits(tokens, positions, mask, torch.tensor([r.block_start for r in requests]), block)
    cache = BlockKVCache(len(requests) + 1, max(r.canvas.numel() for r in requests))
    slots = list(range(len(requests)))
    first = cached_block_logits(engine, cache, requests, slots, block, kind)
    for r in requests:
        r.step = 1
    later = cached_block_logits(engine, cache, requests, slots, block, kind)
    assert (first - uncached).abs().max().item() <= 1e-5
    assert (later - uncached).abs().max().item() <= 1e-5
    # once the block changes, the cached keys are stale: the logits move (the approximation measured below)
    for r in requests:
        r.canvas[r.block_start : r.block_start + block] = 7
    refreshed = engine._block_logits(*engine._prefixes(requests, [r.canvas.numel() for r in requests], block),
                                     torch.tensor([r.block_start for r in requests]), block)
    stale = cached_block_logits(engine, cache, requests, slots, block, kind)
    assert (stale - refreshed).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", ["prefix", "dual"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_cached_decodes_keep_their_trajectories(engines, preset, kind):
    """Several steps per block: the first block's first step is the uncached one (same tokens and log-probs);
    after it the decodes may part (the tiny random models' logits are nearly flat, so one changed token changes
    the rest; the agreement of a trained model is measured by benchmarks/rollout.py). Every token carries its
    reveal step and log-prob, and the forwards are the uncached decode's."""
    engine = engines[preset]
    block = engine.args.diffusion.block_size
    params = SamplingParams(max_new_tokens=24, temperature=0.0, policy="low_confidence_static", steps=4,
                            seeds=(1, 2, 3), stop_token_ids=())
    uncached, cached = engine.generate(PROMPTS, params, cache=False), engine.generate(PROMPTS, params, cache=kind)
    for a, b in zip(cached, uncached):
        first = [k for k in range(block) if b.generated_reveal_steps[k] == 0]
        assert [a.generated_reveal_steps[k] for k in first] == [0] * len(first)
        assert [a.generated_ids[k] for k in first] == [b.generated_ids[k] for k in first]
        assert [a.generated_logprobs[k] for k in first] == [b.generated_logprobs[k] for k in first]
        assert len(a.generated_ids) == len(a.generated_logprobs) == len(a.generated_reveal_steps) == 24
        assert set(a.generated_reveal_steps) == {0, 1, 2, 3} and max(a.generated_logprobs) <= 0
        assert engine.args.diffusion.mask_token_id not in a.generated_ids
        assert a.forwards == b.forwards == 3 * 4


def test_the_dynamic_policy_is_fast_dllms_threshold_rule():
    """Fast-dLLM's get_transfer_index with a threshold, stated plainly: the most confident masked position, and
    every other masked one whose confidence reaches the threshold. `low_confidence_dynamic` reveals the same set
    (confidences drawn continuous: no ties at the threshold, where Fast-dLLM keeps >= and we keep >)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        masked = torch.rand(16, generator=g) < 0.7
        masked[trial % 16] = True
        confidence = torch.rand(16, generator=g, dtype=torch.float64) ** 3
        threshold = float(torch.rand(1, generator=g))
        order = confidence.masked_fill(~masked, float("-inf")).argsort(descending=True)[: int(masked.sum())]
        fast_dllm = torch.zeros(16, dtype=torch.bool)
        fast_dllm[order[0]] = True
        fast_dllm[order[1:][confidence[order[1:]] >= threshold]] = True
        params = SamplingParams(policy="low_confidence_dynamic", threshold=threshold)
        ours = choose_reveals(masked, confidence, torch.zeros(16), 0, 16, int(masked.sum()), params)
        assert torch.equal(ours, fast_dllm), trial


@pytest.mark.parametrize("preset", FAMILIES)
def test_threshold_decoding_takes_fewer_forwards_per_token_than_fixed_steps(engines, preset):
    """At a threshold these nearly uniform tiny models reach (their best tokens have ~0.02-0.06 probability),
    parallel decoding takes fewer forwards per token than one token per step, uncached and cached."""
    engine = engines[preset]
    common = dict(max_new_tokens=32, temperature=0.0, seeds=(1, 2, 3), stop_token_ids=())
    fixed = SamplingParams(policy="low_confidence_static", **common)
    threshold = SamplingParams(policy="low_confidence_dynamic", threshold=0.05, **common)
    for cache in (False, "prefix", "dual"):
        per_token = [sum(c.forwards for c in cs) / sum(len(c.completion_ids) for c in cs)
                     for cs in (engine.generate(PROMPTS, p, cache=cache) for p in (fixed, threshold))]
        assert per_token[0] == 1.0 and per_token[1] < 0.7, (cache, per_token)


def test_the_megatron_backend_decodes_as_the_native_engine_with_each_cache(engines, world1):
    """The Megatron backend runs the same loop with its own attention (the same attend_cached): the same tokens
    and reveal steps, log-probs within 1e-5, for LLaDA and for Dream (its shift applied in Megatron's last stage)."""
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout
    from dare_mega.rollout.megatron_engine import MegatronEngine

    for preset in FAMILIES:
        chunks, args = build_from_hf(cached_tiny_checkpoint(preset), ParallelLayout())
        megatron = MegatronEngine(Runner(chunks, args))
        params = SamplingParams(max_new_tokens=16, temperature=1.0, policy="low_confidence_dynamic", threshold=0.05,
                                seeds=(1, 2, 3), stop_token_ids=())
        for kind in ("prefix", "dual"):
            ours, theirs = megatron.generate(PROMPTS, params, cache=kind), engines[preset].generate(PROMPTS, params,
                                                                                                      cache=kind)
            for a, b in zip(ours, theirs):
                assert a.generated_ids == b.generated_ids, (preset, kind)
                assert a.generated_reveal_steps == b.generated_reveal_steps, (preset, kind)
                assert max(abs(x - y) for x, y in zip(a.generated_logprobs, b.generated_logprobs)) <= 1e-5


def test_which_cache_a_run_uses_and_bad_values(engines, tmp_path):
    """rollout.cache=true gives masked diffusion rollout.masked_cache (default prefix, DARE's use_cache) and block
    diffusion its exact block cache; unknown values are refused by name."""
    from dare_mega.config import load_config
    from dare_mega.trainer.config import RLConfig

    llada, sdar = engines["tiny-llada"].args, NativeEngine.from_pretrained(cached_tiny_checkpoint("tiny-sdar"),
                                                                           tokenizer=False)
    assert RLConfig().rollout.masked_cache == "prefix"
    assert cache_setting(True, "prefix", llada) == "prefix" and cache_setting(True, "dual", llada) == "dual"
    assert cache_setting(True, "none", llada) == "none" and cache_setting(False, "dual", llada) is False
    assert cache_setting(True, "dual", sdar.args) is True
    with pytest.raises(ConfigError, match="rollout.masked_cache='both'; expected one of none, prefix, dual"):
        cache_setting(True, "both", llada)
    with pytest.raises(ConfigError, match="masked_cache"):
        load_config(RLConfig, None, ["model.preset=tiny-llada", f"run_dir={tmp_path}", "rollout.masked_cache=full"])
    with pytest.raises(ConfigError, match="cache='full'; expected True, False or one of none, prefix, dual"):
        engines["tiny-llada"].generate(PROMPTS, SamplingParams(max_new_tokens=4), cache="full")
    with pytest.raises(ConfigError, match="cache='dual' is a masked-diffusion cache .* block diffusion model"):
        sdar.generate(PROMPTS, SamplingParams(max_new_tokens=4), cache="dual")
