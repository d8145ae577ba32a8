"""The trainer's replay of a trajectory from its tokens alone (rollout/replay.py: what the RL loop does with SGLang's
responses), against the native engine that decoded them: the same reveal steps, the same tokens after a stop inside
the last block, log-probs within 1e-5 (float32), every unmasking policy, greedy and sampled, with and without the
block KV cache; a token the engine did not choose is counted and kept; lockstep replicas; the refusals. On the
Megatron shards at TP / PP / EP: tests/test_megatron_rollout.py; in the RL loop on a (fake) SGLang server:
tests/test_sglang.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dare_mega.errors import ConfigError
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.policies import block_generator
from dare_mega.rollout.replay import replay
from dare_mega.rollout.types import SamplingParams

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [4], list(range(20, 31))]
CASES = {
    "sampled": dict(temperature=1.0),
    "greedy": dict(temperature=0.0),
    "static_top_k_top_p": dict(temperature=0.8, top_k=20, top_p=0.9, policy="low_confidence_static", steps=2),
    "entropy_bounded": dict(temperature=1.0, policy="entropy_bounded", entropy_bound=1.0),
    "low_threshold_tempered": dict(temperature=0.7, threshold=0.3, logprob_temperature=1.0),
}
# a quarter of the vocabulary stops, so that some requests stop inside a block
STOPS = tuple(range(0, 256, 4))


@pytest.fixture(scope="module")
def engines(tiny_dir):
    return {f: NativeEngine.from_pretrained(tiny_dir[f]) for f in ("sdar_moe", "llada2_moe")}


def tokens_only(completions):
    """What an SGLang response gives: the prompt and the answer's tokens."""
    return [dataclasses.replace(c, logprobs=[], reveal_steps=[], generated_ids=[], generated_logprobs=[],
                                generated_reveal_steps=[]) for c in completions]


def assert_same_trajectories(replayed, decoded):
    for mine, theirs in zip(replayed, decoded, strict=True):
        assert mine.completion_ids == theirs.completion_ids
        assert mine.generated_ids == theirs.generated_ids  # the tokens after a stop in the last block too
        assert mine.generated_reveal_steps == theirs.generated_reveal_steps
        assert mine.reveal_steps == theirs.reveal_steps
        gap = max(abs(a - b) for a, b in zip(mine.generated_logprobs, theirs.generated_logprobs, strict=True))
        assert gap <= 1e-5, gap
        assert len(mine.logprobs) == len(mine.completion_ids)


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_replay_gives_the_engines_trajectories(engines, family, case):
    engine, cache = engines[family], case != "sampled"  # the engine's two loops give the same trajectories
    params = SamplingParams(max_new_tokens=13, seeds=(3, 4, 5, 6), stop_token_ids=STOPS, **CASES[case])
    decoded = engine.generate(PROMPTS, params, cache=cache)
    replayed, stats = replay(engine, tokens_only(decoded), params)
    assert_same_trajectories(replayed, decoded)
    assert stats.mismatched == 0 and stats.checked == sum(len(c.completion_ids) for c in decoded)
    steps = params.steps or engine.args.diffusion.block_size
    assert stats.forwards <= steps  # every block at once: at most `steps` forwards


def test_stops_inside_a_block_are_replayed(engines):
    """The cases above do stop inside a block (positions the engine decoded but did not return)."""
    engine = engines["sdar_moe"]
    params = SamplingParams(max_new_tokens=13, seeds=(3, 4, 5, 6), stop_token_ids=STOPS, temperature=1.0)
    decoded = engine.generate(PROMPTS, params)
    assert any(c.finish_reason == "stop" and len(c.generated_ids) > len(c.completion_ids) for c in decoded)


def test_rows_split_to_the_logits_budget_give_the_same(engines):
    engine = engines["llada2_moe"]
    params = SamplingParams(max_new_tokens=10, seeds=(1, 2, 3, 4), temperature=1.0, stop_token_ids=())
    decoded = engine.generate(PROMPTS, params)
    whole, one = replay(engine, tokens_only(decoded), params), replay(engine, tokens_only(decoded), params, 1)
    assert_same_trajectories(whole[0], decoded)
    assert_same_trajectories(one[0], decoded)
    assert one[1].forwards > whole[1].forwards  # one row per forward


def test_a_token_the_engine_did_not_choose_is_counted_and_kept(engines):
    """A server with other weights answers other tokens: each differing token is counted, the server's token
    stays in the trajectory (teacher forcing) and its log-prob is the replay model's for that token."""
    engine = engines["sdar_moe"]
    params = SamplingParams(max_new_tokens=8, seeds=(7,), temperature=0.0, stop_token_ids=())
    decoded = engine.generate([PROMPTS[1]], params)[0]
    forced = list(decoded.completion_ids)
    forced[2] = (forced[2] + 1) % engine.args.vocab_size
    if forced[2] == engine.args.diffusion.mask_token_id:
        forced[2] = (forced[2] + 1) % engine.args.vocab_size
    replayed, stats = replay(engine, tokens_only([dataclasses.replace(decoded, completion_ids=forced)]), params)
    assert stats.mismatched >= 1 and stats.samples_mismatched == 1 and stats.mismatch_fraction > 0
    assert replayed[0].completion_ids == forced and replayed[0].generated_ids[: len(forced)] == forced
    assert replayed[0].extra["replay_mismatches"] == stats.mismatched
    # the forced token's log-prob: the model's distribution at its reveal step, from a direct forward
    p, block = len(PROMPTS[1]), engine.args.diffusion.block_size
    k, step = 2, replayed[0].reveal_steps[2]
    position = p + k
    start = position // block * block
    canvas = torch.tensor(PROMPTS[1] + replayed[0].generated_ids)
    state = canvas[: start + block].clone()
    later = [start + j for j in range(block) if start + j >= p and replayed[0].generated_reveal_steps[start + j - p] >= step]
    state[later] = engine.args.diffusion.mask_token_id
    n = start + block
    blk = torch.arange(n) // block
    mask = (blk[None, :] <= blk[:, None])[None]
    logits = engine.model(state[None], torch.arange(n)[None], mask)[0, position]
    direct = float(torch.log_softmax(logits.float(), -1)[forced[2]])
    assert abs(replayed[0].logprobs[2] - direct) <= 1e-5


class Lockstep(NativeEngine):
    """A replica whose other replicas run `extra` more forwards than it: it must keep them company."""

    def __init__(self, engine, extra: int):
        self.__dict__.update(engine.__dict__)
        self.extra, self.idle = extra, 0

    def _another_forward(self, active):
        if active:
            return True
        self.extra -= 1
        return self.extra >= 0

    def _idle_forward(self, block):
        self.idle += 1


def test_a_replica_with_less_to_replay_idles_in_the_others_forwards(engines):
    engine = engines["sdar_moe"]
    params = SamplingParams(max_new_tokens=8, seeds=(1, 2), temperature=1.0, stop_token_ids=())
    decoded = engine.generate(PROMPTS[:2], params)
    replica = Lockstep(engine, extra=3)
    replayed, _ = replay(replica, tokens_only(decoded), params)
    assert_same_trajectories(replayed, decoded)
    assert replica.idle == 3
    empty = Lockstep(engine, extra=2)
    assert replay(empty, [], params)[0] == [] and empty.idle == 2


def test_block_generators_depend_on_the_seed_and_the_block_only():
    draws = {(s, b): torch.rand(4, generator=block_generator(s, b)) for s in (0, 1) for b in (0, 1)}
    assert torch.equal(draws[0, 1], torch.rand(4, generator=block_generator(0, 1)))
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    assert block_generator(None, 3) is None


def test_refusals(engines):
    engine = engines["sdar_moe"]
    params = SamplingParams(max_new_tokens=4, seeds=(1,), temperature=1.0)
    decoded = engine.generate([[5, 6]], params)
    with pytest.raises(ConfigError, match="without a seed cannot be replayed"):
        replay(engine, tokens_only([dataclasses.replace(decoded[0], seed=None)]), params)
    with pytest.raises(ConfigError, match="block size 8, but the replay's model decodes with 4"):
        replay(engine, tokens_only([dataclasses.replace(decoded[0], block_size=8)]), params)


def test_a_completion_that_holds_no_decoded_token_is_refused(engines):
    engine = engines["sdar_moe"]
    params = SamplingParams(max_new_tokens=4, seeds=(1,), temperature=1.0)
    decoded = engine.generate([[5, 6]], params)[0]
    mask = engine.args.diffusion.mask_token_id
    for token, why in ((mask, "the mask id"), (engine.args.vocab_size, "outside the vocabulary")):
        bad = dataclasses.replace(decoded, completion_ids=decoded.completion_ids[:1] + [token])
        with pytest.raises(ConfigError, match=f"completion 0 holds token {token} at answer position 1, {why}"):
            replay(engine, tokens_only([bad]), params)


def test_a_prompt_holding_the_mask_id_stays_the_prompt(engines):
    """A prompt with the mask id in it (SGLang keeps it as the prompt): never revealed, and the answer's
    positions alone count for the unmasking quota."""
    engine = engines["sdar_moe"]
    mask = engine.args.diffusion.mask_token_id
    params = SamplingParams(max_new_tokens=6, seeds=(2,), temperature=1.0, stop_token_ids=(),
                            policy="low_confidence_static", steps=2)
    decoded = engine.generate([[5, mask, 7]], params)[0]
    replayed, stats = replay(engine, tokens_only([decoded]), params)
    assert replayed[0].prompt_ids == [5, mask, 7] and len(replayed[0].generated_ids) == 9
    assert all(0 <= r < 2 for r in replayed[0].generated_reveal_steps) and stats.forwards == 2
