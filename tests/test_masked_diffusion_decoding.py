"""Masked diffusion decoding (LLaDA's semi-autoregressive generate) in the native engine and on the Megatron
backend, against a slow, direct transcription of the rule on the plain-PyTorch LLaDA reference: the canvas is
the prompt and the new tokens' masks in whole blocks counted from the end of the prompt; each step one forward
of the whole canvas with bidirectional attention; in the current block the masked positions are filled with
their best token (the mask id excluded) and the quota of the step (mask count // steps, the remainder first)
revealed, the most confident first (`low_confidence_static`, LLaDA's low_confidence) or at random with the
block's own uniforms (`random_static`, LLaDA's random)."""

from __future__ import annotations

import pytest
import torch

from dare_mega.errors import ConfigError
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.policies import block_generator
from dare_mega.rollout.types import SamplingParams

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [40]]


@pytest.fixture(scope="module")
def llada(tiny_dir):
    from dare_mega.models.llada.reference import reference_model

    return NativeEngine.from_pretrained(tiny_dir["llada"], tokenizer=False), reference_model(tiny_dir["llada"])


def direct_generate(model, prompt, new_tokens, block, steps, mask_id, policy, seed, confidence_of="raw"):
    """LLaDA's generate() at temperature 0, one request, stated plainly: (generated ids, reveal step of each)."""
    p = len(prompt)
    blocks = -(-new_tokens // block)
    x = torch.tensor(prompt + [mask_id] * (blocks * block))
    revealed_at = [-1] * (blocks * block)
    n = x.numel()
    for b in range(blocks):
        s0, s1 = p + b * block, p + (b + 1) * block
        generator = block_generator(seed, b)
        masked_count = int((x[s0:s1] == mask_id).sum())
        quotas = [masked_count // steps + (1 if i < masked_count % steps else 0) for i in range(steps)]
        for i in range(steps):
            with torch.no_grad():
                logits = model(x[None], torch.arange(n)[None], torch.ones(1, 1, n, n, dtype=torch.bool)).logits[0]
            raw = logits[s0:s1].float()
            logits = raw.clone()
            logits[:, mask_id] = float("-inf")  # the engine never reveals the mask token itself
            x0 = logits.argmax(-1)
            if confidence_of == "raw":  # LLaDA's: softmax of the raw logits in float64, the mask id included
                confidence = torch.softmax(raw.double(), -1).gather(-1, x0[:, None])[:, 0]
            else:  # the distribution the token was drawn from (the mask id excluded)
                confidence = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0].double()
            torch.rand(block, generator=generator)  # the engine's fixed draw per step, greedy or not
            if policy == "random_static":
                confidence = torch.rand(block, generator=generator, dtype=torch.float64)
            masked = x[s0:s1] == mask_id
            count = int(masked.sum()) if i == steps - 1 else min(quotas[i], int(masked.sum()))
            if count == 0:
                continue
            chosen = confidence.masked_fill(~masked, float("-inf")).topk(count).indices
            x[s0 + chosen] = x0[chosen]
            for k in chosen.tolist():
                revealed_at[b * block + k] = i
            if not (x[s0:s1] == mask_id).any():
                break
    return x[p:].tolist(), revealed_at


@pytest.mark.parametrize("policy, confidence", [("low_confidence_static", None), ("random_static", None),
                                                ("low_confidence_static", "sampling")])
@pytest.mark.parametrize("steps", [8, 3])
def test_the_engine_decodes_as_llada_generate(llada, policy, confidence, steps):
    """LLaDA's family default ranks by the raw logits' softmax (confidence=None: "raw"); "sampling" ranks by the
    distribution the token was drawn from."""
    engine, reference = llada
    args = engine.args
    params = SamplingParams(max_new_tokens=13, temperature=0.0, policy=policy, steps=steps, seeds=(1, 2, 3),
                            stop_token_ids=(), confidence=confidence)
    completions = engine.generate(PROMPTS, params, cache=False)
    for prompt, seed, c in zip(PROMPTS, (1, 2, 3), completions):
        ids, steps_of = direct_generate(reference, prompt, 13, args.diffusion.block_size, steps,
                                        args.diffusion.mask_token_id, policy, seed, confidence or "raw")
        assert c.generated_ids == ids and c.generated_reveal_steps == steps_of
        assert c.completion_ids == ids[:13] and len(ids) == 16  # two blocks of 8 after the prompt
    assert completions[0].forwards == 2 * steps


def test_dream_decodes_by_the_same_rule_on_its_shifted_logits(tiny_dir):
    """Dream (transformers' Qwen2 + the shift as the reference): the engine's decode is the direct transcription's,
    each position revealed from the logits of the position before it."""
    from dare_mega.models.dream.reference import reference_model

    engine = NativeEngine.from_pretrained(tiny_dir["dream"], tokenizer=False)
    reference = reference_model(tiny_dir["dream"])
    args = engine.args
    params = SamplingParams(max_new_tokens=13, temperature=0.0, policy="low_confidence_static", steps=3,
                            seeds=(1, 2, 3), stop_token_ids=())
    for prompt, seed, c in zip(PROMPTS, (1, 2, 3), engine.generate(PROMPTS, params, cache=False)):
        ids, steps_of = direct_generate(reference, prompt, 13, args.diffusion.block_size, 3,
                                        args.diffusion.mask_token_id, "low_confidence_static", seed, "sampling")
        assert c.generated_ids == ids and c.generated_reveal_steps == steps_of


@pytest.mark.parametrize("policy", ["low_confidence_static", "random_static"])
def test_llada_moe_decodes_as_llada_generate(tiny_dir, policy):
    """LLaDA-MoE (its softmax top-k experts in the engine's forward) decodes by LLaDA's rule on the plain-PyTorch
    reference of its published code."""
    from dare_mega.models.llada_moe.reference import reference_model

    engine = NativeEngine.from_pretrained(tiny_dir["llada_moe"], tokenizer=False)
    reference = reference_model(tiny_dir["llada_moe"])
    args = engine.args
    params = SamplingParams(max_new_tokens=13, temperature=0.0, policy=policy, steps=3, seeds=(1, 2, 3),
                            stop_token_ids=())
    for prompt, seed, c in zip(PROMPTS, (1, 2, 3), engine.generate(PROMPTS, params, cache=False)):
        ids, steps_of = direct_generate(reference, prompt, 13, args.diffusion.block_size, 3,
                                        args.diffusion.mask_token_id, policy, seed)
        assert c.generated_ids == ids and c.generated_reveal_steps == steps_of
        assert len(ids) == 16  # two blocks of 8 after the prompt


def test_the_megatron_backend_decodes_the_same(llada, tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout
    from dare_mega.rollout.megatron_engine import MegatronEngine

    engine, _ = llada
    chunks, args = build_from_hf(tiny_dir["llada"], ParallelLayout())
    megatron = MegatronEngine(Runner(chunks, args))
    for params in (SamplingParams(max_new_tokens=10, temperature=0.0, policy="low_confidence_static", steps=4,
                                  seeds=(1, 2, 3), stop_token_ids=()),
                   SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seeds=(4, 5, 6),
                                  stop_token_ids=(60, 61, 62))):
        ours, theirs = megatron.generate(PROMPTS, params, cache=False), engine.generate(PROMPTS, params, cache=False)
        for a, b in zip(ours, theirs):
            assert a.generated_ids == b.generated_ids and a.generated_reveal_steps == b.generated_reveal_steps
            assert a.completion_ids == b.completion_ids and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.generated_logprobs, b.generated_logprobs)) <= 1e-5


def test_a_stop_inside_a_block_keeps_the_full_length_decode(llada):
    """By default (LLaDA's generate, DARE's rollouts) a request decodes its whole canvas and its answer ends at the
    stop; with stop_early it ends after the block that holds the stop, which changes nothing before it: later
    blocks were still masks when it was decoded, as in the full-length decode."""
    engine, _ = llada
    full = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, seeds=(7, 8, 9),
                                                   stop_token_ids=()), cache=False)
    stops = (full[1].generated_ids[9],)  # a token of the second block of request 1
    first = full[1].generated_ids.index(stops[0])
    for stop_early in (None, True):
        cut = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, seeds=(7, 8, 9),
                                                      stop_token_ids=stops, stop_early=stop_early), cache=False)
        c = cut[1]
        assert c.finish_reason == "stop" and c.completion_ids == full[1].generated_ids[: first + 1]
        assert len(c.logprobs) == len(c.reveal_steps) == first + 1
        if stop_early:
            assert c.generated_ids == full[1].generated_ids[: len(c.generated_ids)] and len(c.generated_ids) == 16
            assert c.forwards < full[1].forwards
        else:  # the whole canvas, as without the stop
            assert c.generated_ids == full[1].generated_ids and c.forwards == full[1].forwards
            assert c.generated_logprobs == full[1].generated_logprobs


def test_block_diffusion_only_estimators_and_the_replay_refuse_masked_diffusion_by_name(llada, tmp_path):
    """EBPO's composite ELBO (one noise level per block) is block diffusion's: on LLaDA the run is refused before
    any process group exists, naming the estimators that apply; so is the replay of SGLang trajectories."""
    from dare_mega.config import load_config
    from dare_mega.rollout.replay import replay
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.rl_setup import check_inputs

    cfg = load_config(RLConfig, None, ["model.preset=tiny-llada", f"run_dir={tmp_path}", "task.train_prompts=4",
                                       "task.heldout=2", "algorithm.estimator=ebpo"])
    with pytest.raises(ConfigError, match="estimator=ebpo is defined for block diffusion only; LLaDAModelLM .* "
                                          "masked diffusion model .* use one of bgpo, coupled, d1, espo, spg"):
        check_inputs(cfg)
    engine, _ = llada
    with pytest.raises(ConfigError, match="replay: LLaDAModelLM is a masked diffusion model"):
        replay(engine, [], SamplingParams(temperature=0.0))


def test_the_tokenizer_loads_without_the_checkpoints_own_code(tiny_dir):
    """LLaDA's config.json names its modeling code (auto_map): loading the tokenizer must not ask to run it
    (a prompt that waits for an answer nobody gives) nor run it."""
    import subprocess
    import sys

    from conftest import REPO, clean_env

    code = ("from dare_mega.data.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({tiny_dir['llada']!r}); print('mask', t.mask_token_id)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mask 261" in proc.stdout and "custom code" not in proc.stdout + proc.stderr


# ---- Dream's diffusion_generate algorithms ------------------------------------------------------------------


def direct_dream_generate(model, prompt, new_tokens, steps, mask_id, alg, alg_temp, seed, top_p=1.0, eps=1e-3):
    """Dream's diffusion_generate at temperature 0 for one request, stated plainly (the whole generation is one
    block): (generated ids, reveal step of each). The uniforms are the engine's (its block generator: one per
    position for the token, then, for origin, one per position for the reveal); the mask id is never chosen."""
    p = len(prompt)
    x = torch.tensor(prompt + [mask_id] * new_tokens)
    revealed_at = [-1] * new_tokens
    generator = block_generator(seed, 0)
    timesteps = torch.linspace(1, eps, steps + 1)
    n = x.numel()
    for i in range(steps):
        masked = x[p:] == mask_id
        if not masked.any():
            break  # Dream runs its remaining steps with nothing left to reveal
        with torch.no_grad():
            logits = model(x[None], torch.arange(n)[None], torch.ones(1, 1, n, n, dtype=torch.bool)).logits[0, p:]
        logits = logits.float().clone()
        logits[:, mask_id] = float("-inf")
        if top_p < 1:  # Dream's top_p_logits: drop what lies past the token that crosses top_p
            order = logits.argsort(dim=-1, descending=True)
            sorted_probs = torch.softmax(logits.gather(-1, order), dim=-1)
            before = sorted_probs.cumsum(-1) - sorted_probs
            logits = logits.scatter(-1, order, logits.gather(-1, order).masked_fill(before > top_p, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        torch.rand(new_tokens, generator=generator)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            top = probs.sort(dim=-1, descending=True).values
            confidence = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            chosen = torch.nonzero(masked & (torch.rand(new_tokens, generator=generator) < p_transfer))[:, 0]
        else:
            count = int(masked.sum() / 1 * (1 - s / t)) if i < steps - 1 else int(masked.sum())
            full = torch.full((new_tokens,), float("-inf"))
            full[masked] = confidence[masked]
            if count == 0:
                continue
            if alg_temp:
                chosen = torch.multinomial(torch.softmax(full / alg_temp, dim=-1), count, generator=generator)
            else:
                chosen = full.topk(count).indices
        for k in chosen.tolist():
            x[p + k] = x0[k]
            revealed_at[k] = i
    return x[p:].tolist(), revealed_at


@pytest.fixture(scope="module")
def dream(tiny_dir):
    from dare_mega.models.dream.reference import reference_model

    return NativeEngine.from_pretrained(tiny_dir["dream"], tokenizer=False), reference_model(tiny_dir["dream"])


@pytest.mark.parametrize("alg,alg_temp,steps,top_p", [
    ("maskgit_plus", 0.0, 12, 1.0), ("topk_margin", 0.0, 5, 1.0), ("entropy", 0.0, 12, 0.02),
    ("entropy", 0.5, 5, 1.0), ("origin", 0.0, 5, 1.0)])
def test_each_dream_algorithm_decodes_as_dream_generate(dream, alg, alg_temp, steps, top_p):
    """Dream (block = the whole generation, as its generate): tokens and reveal steps as the direct
    transcription, on its shifted logits; the filters change the confidence at temperature 0 too."""
    engine, reference = dream
    args = engine.args
    params = SamplingParams(max_new_tokens=12, block_size=12, temperature=0.0, top_p=top_p, policy=alg,
                            alg_temp=alg_temp, steps=steps, seeds=(1, 2, 3), stop_token_ids=())
    completions = engine.generate(PROMPTS, params, cache=False)
    for prompt, seed, c in zip(PROMPTS, (1, 2, 3), completions):
        ids, steps_of = direct_dream_generate(reference, prompt, 12, steps, args.diffusion.mask_token_id, alg,
                                              alg_temp, seed, top_p=top_p)
        assert c.generated_ids == ids and c.generated_reveal_steps == steps_of, (alg, prompt)
    # Dream's schedule reveals int(n * (1 - s / t)) at each step: 12 masks over 12 steps reveal 0 at the first
    # step (12 * 0.999 / 12 truncates to 0) and everything left at the last
    if alg == "maskgit_plus":
        assert all(-1 not in c.generated_reveal_steps and 0 not in c.generated_reveal_steps for c in completions)
        assert all(c.generated_reveal_steps.count(steps - 1) >= 1 for c in completions)


def test_dream_transfer_counts_follow_the_timestep_schedule():
    """1 - s / t on linspace(1, eps, steps + 1), against the closed form (t_i = 1 - i (1 - eps) / steps)."""
    from dare_mega.rollout.policies import dream_transfer_fraction

    for steps in (1, 4, 7, 64):
        for i in range(steps):
            t, s = 1 - i * (1 - 1e-3) / steps, 1 - (i + 1) * (1 - 1e-3) / steps
            assert abs(float(dream_transfer_fraction(i, steps, 1e-3)) - (1 - s / t)) < 1e-6
    assert int(8 * dream_transfer_fraction(0, 4, 1e-3)) == 1  # 8 * 0.24975 = 1.998: Dream truncates


def test_the_confidence_rule_is_the_familys_unless_asked(llada, tiny_dir):
    """confidence=None is the family's (raw for LLaDA, as its generate; sampling for Dream); the two rules rank
    differently at temperature > 0; an unknown rule is refused by name, here and in the RL config."""
    from dare_mega.config import load_config
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.rl_phases import sampling

    engine, _ = llada
    common = dict(max_new_tokens=13, temperature=0.7, policy="low_confidence_static", steps=3, seeds=(1, 2, 3),
                  stop_token_ids=())
    decode = {c: [(x.generated_ids, x.generated_reveal_steps)
                  for x in engine.generate(PROMPTS, SamplingParams(**common, confidence=c), cache=False)]
              for c in (None, "raw", "sampling")}
    assert decode[None] == decode["raw"] != decode["sampling"]
    dream = NativeEngine.from_pretrained(tiny_dir["dream"], tokenizer=False)
    assert [x.generated_ids for x in dream.generate(PROMPTS, SamplingParams(**common), cache=False)] == \
        [x.generated_ids for x in dream.generate(PROMPTS, SamplingParams(**common, confidence="sampling"), cache=False)]
    with pytest.raises(ConfigError, match="confidence='logits'; expected one of sampling, raw"):
        engine.generate(PROMPTS, SamplingParams(**{**common, "confidence": "logits"}))
    assert sampling(load_config(RLConfig, None, []), [0]).confidence is None  # auto: the family's
    assert sampling(load_config(RLConfig, None, ["rollout.confidence=raw"]), [0]).confidence == "raw"
    with pytest.raises(ConfigError, match="rollout.confidence"):
        load_config(RLConfig, None, ["rollout.confidence=logits"])
