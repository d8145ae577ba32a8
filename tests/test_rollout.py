"""The native block-diffusion rollout engine: cache parity, trajectories, policies, sampling, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, clean_env

from dare_mega.errors import ConfigError
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.policies import choose_reveals
from dare_mega.rollout.types import SamplingParams

PROMPTS = [[5], [11, 12, 13, 14, 15], [7] * 9, list(range(30, 56))]  # uneven: 1, 5, 9, 26 tokens


@pytest.fixture(scope="module")
def engines(tiny_dir):
    return {family: NativeEngine.from_pretrained(tiny_dir[family]) for family in ("sdar", "sdar_moe", "llada2_moe")}


@pytest.mark.parametrize("family", ["sdar", "sdar_moe", "llada2_moe"])
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=()),
    SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, stop_token_ids=()),
    SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, seed=1, policy="low_confidence_static", steps=2,
                   block_size=8, stop_token_ids=()),
    SamplingParams(max_new_tokens=9, temperature=1.0, seed=2, policy="entropy_bounded", entropy_bound=8.0,
                   stop_token_ids=()),
    SamplingParams(max_new_tokens=12, temperature=1.0, seed=3),  # may stop on a sampled EOS
], ids=["greedy", "top-p", "static-block8", "entropy", "eos"])
def test_cache_and_no_cache_agree(engines, family, params):
    engine = engines[family]
    cached = engine.generate(PROMPTS, params, cache=True)
    uncached = engine.generate(PROMPTS, params, cache=False)
    for a, b in zip(cached, uncached):
        assert a.generated_ids == b.generated_ids and a.completion_ids == b.completion_ids
        assert a.generated_reveal_steps == b.generated_reveal_steps and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.generated_logprobs, b.generated_logprobs)) <= 1e-5
        if params.stop_token_ids == ():
            assert len(a.completion_ids) == params.max_new_tokens and a.finish_reason == "length"


def test_step_map_is_consistent(engines):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, steps=3)
    for c in engines["llada2_moe"].generate(PROMPTS, params):
        block = c.block_size
        assert len(c.generated_reveal_steps) == len(c.generated_ids) and len(c.reveal_steps) == len(c.completion_ids)
        assert all(0 <= s < 3 for s in c.generated_reveal_steps)
        assert (len(c.prompt_ids) + len(c.generated_ids)) % block == 0  # whole blocks are decoded
        assert c.generated_ids[: len(c.completion_ids)] == c.completion_ids
        assert all(t != 259 for t in c.generated_ids)  # the mask token is never emitted
        assert len(c.logprobs) == len(c.completion_ids) and all(lp <= 0 for lp in c.logprobs)
        assert c.forwards > 0 and c.weight_version == 0


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_replaying_the_trajectory_gives_the_rollout_log_probs(engines, tiny_dir, family, world1):
    """Train/rollout agreement: the two-stream training forward recomputes every rollout log-prob."""
    from dare_mega.algorithms.rl import replay_log_probs
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout

    chunks, args = build_from_hf(tiny_dir[family], ParallelLayout())
    runner = Runner(chunks, args)
    params = SamplingParams(max_new_tokens=11, temperature=1.0, seed=9, policy="low_confidence_static", steps=2)
    for c in engines[family].generate(PROMPTS, params):
        replayed = replay_log_probs(runner, c, args.diffusion.mask_token_id)
        assert max(abs(a - b) for a, b in zip(replayed, c.generated_logprobs)) <= 1e-4


def test_static_reveals_its_quota(engines):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=0, policy="low_confidence_static", steps=3)
    (c,) = engines["sdar_moe"].generate([[1, 2, 3, 4]], params)  # prompt = one full block: 4 masks per block
    for b in range(0, 16, 4):
        steps = c.generated_reveal_steps[b : b + 4]
        assert sorted(steps.count(s) for s in range(3)) == [1, 1, 2], steps  # 4 // 3 = 1, +1 for the first


def test_policy_rules():
    masked = torch.tensor([True, True, True, False, True])
    confidence = torch.tensor([0.95, 0.2, 0.91, 0.99, 0.5])
    entropy = torch.tensor([0.1, 2.0, 0.3, 0.0, 1.0])
    dynamic = SamplingParams(policy="low_confidence_dynamic", threshold=0.9)
    assert choose_reveals(masked, confidence, entropy, 0, 4, 4, dynamic).tolist() == [True, False, True, False, False]
    low = torch.tensor([0.3, 0.2, 0.1, 0.99, 0.5])
    assert choose_reveals(masked, low, entropy, 0, 4, 4, dynamic).tolist() == [False, False, False, False, True]
    assert choose_reveals(masked, low, entropy, 3, 4, 4, dynamic).tolist() == masked.tolist()  # last step: all
    static = SamplingParams(policy="low_confidence_static")
    assert choose_reveals(masked, low, entropy, 0, 3, 4, static).sum() == 2  # 4 // 3 + 1
    assert choose_reveals(masked, low, entropy, 1, 3, 4, static).sum() == 1
    bounded = SamplingParams(policy="entropy_bounded", entropy_bound=0.5)
    assert choose_reveals(masked, low, entropy, 0, 4, 4, bounded).tolist() == [True, False, True, False, False]


def test_seeds_repeat_and_differ(engines):
    engine = engines["sdar_moe"]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=12))
    assert [x.completion_ids for x in a] == [x.completion_ids for x in b]
    assert [x.completion_ids for x in a] != [x.completion_ids for x in c]
    # a request's randomness is its own: alone or batched, the same seed gives the same tokens
    (alone,) = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, temperature=1.0, seeds=(13,)))
    assert alone.completion_ids == a[2].completion_ids


def test_stop_token_cuts_the_completion(engines):
    engine = engines["sdar_moe"]
    (free,) = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=0.0))
    stop = free.completion_ids[5]
    first = free.completion_ids.index(stop)
    (stopped,) = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.completion_ids == free.completion_ids[: first + 1]
    block_end = -(-(3 + first + 1) // 4) * 4
    assert len(stopped.generated_ids) == block_end - 3  # the rest of the last block stays in the trajectory
    assert stopped.forwards < free.forwards


def test_bad_input(engines):
    engine = engines["sdar_moe"]
    with pytest.raises(ConfigError, match="prompt list is empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(ConfigError, match="more than the model's context of 2048"):
        engine.generate([[1] * 2000], SamplingParams(max_new_tokens=100))
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        engine.generate([[1]], SamplingParams(max_new_tokens=0))
    with pytest.raises(ConfigError, match="policy='greedy'"):
        engine.generate([[1]], SamplingParams(policy="greedy"))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.generate([[1, 9999]], SamplingParams())
    with pytest.raises(ConfigError, match="top_p=0"):
        engine.generate([[1]], SamplingParams(top_p=0.0))


def test_load_weights_updates_and_stamps_the_version(tiny_dir, tmp_path):
    from dare_mega.checkpoint.tiny import make_tiny_checkpoint
    from dare_mega.storage.safetensors_io import CheckpointReader

    engine = NativeEngine.from_pretrained(tiny_dir["sdar_moe"], tokenizer=False)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(PROMPTS, params)
    other = CheckpointReader(make_tiny_checkpoint(str(tmp_path / "other"), "tiny-sdar-moe", seed=1))
    names = other.names()
    q = [n for n in names if n.endswith("layers.0.self_attn.q_proj.weight")]
    assert engine.load_weights([(q[0], other.get(q[0]))], version=1) == 0  # waits for k and v
    applied = engine.load_weights(((n, other.get(n)) for n in names), version=2)
    after = engine.generate(PROMPTS, params)
    assert applied > 0 and all(c.weight_version == 2 for c in after)
    assert [c.completion_ids for c in after] != [c.completion_ids for c in before]
    fresh = NativeEngine.from_pretrained(str(tmp_path / "other"), tokenizer=False).generate(PROMPTS, params)
    assert [c.completion_ids for c in after] == [c.completion_ids for c in fresh]
    with pytest.raises(ConfigError, match="not a tensor of"):
        engine.load_weights([("model.layers.0.bogus.weight", torch.zeros(1))], version=3)


def test_engine_reads_a_torch_dist_checkpoint(tiny_dir, tmp_path, world1):
    from dare_mega.checkpoint.torch_dist import save_from_hf
    from dare_mega.parallel import ParallelLayout

    save_from_hf(tiny_dir["llada2_moe"], str(tmp_path / "mcore"), ParallelLayout())
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    from_hf = NativeEngine.from_pretrained(tiny_dir["llada2_moe"]).generate(PROMPTS, params)
    from_mcore = NativeEngine.from_pretrained(str(tmp_path / "mcore")).generate(PROMPTS, params)
    assert [c.completion_ids for c in from_hf] == [c.completion_ids for c in from_mcore]


def test_cli(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1, 2, 3]}) + "\n" + json.dumps({"prompt": "What is 2+3?"}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dare_mega.rollout", "--hf", tiny_dir["llada2_moe"], "--prompts",
                           str(prompts), "--json", str(out), "--max-new-tokens", "8", "--policy",
                           "low_confidence_static", "--steps", "2", "--seed", "5"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout and "forwards per token" in proc.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["prompt_ids"] == [1, 2, 3]
    for line in lines:
        assert len(line["logprobs"]) == len(line["reveal_steps"]) == len(line["completion_ids"]) == 8
        assert line["forwards"] > 0 and isinstance(line["text"], str)
    bad = subprocess.run([sys.executable, "-m", "dare_mega.rollout", "--hf", tiny_dir["llada2_moe"], "--prompt", "x",
                          "--max-new-tokens", "0"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "max_new_tokens=0" in bad.stderr
