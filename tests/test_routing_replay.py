"""MoE routing replay (R3): the trainer's forwards route as they are told, token by token, and nothing else moves.

In-process on the tiny SDAR-MoE (one rank). The multi-rank case (TP=2 x EP=2 with sequence parallelism equals
one process, with replay on) is in tests/test_rl.py.
"""

from __future__ import annotations

import pytest
import torch

from dare_mega.algorithms.estimators import Sample, Totals, build
from dare_mega.algorithms.policy import LossConfig
from dare_mega.algorithms.rl import noisy_log_probs, policy_gradient, prepare, rows_to_batch
from dare_mega.errors import ConfigError
from dare_mega.models.routing import mismatch_counts, record_megatron_routing, replay_routing
from dare_mega.rollout.engine import NativeEngine
from dare_mega.rollout.types import SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def replayable(tiny_dir, world1):
    """The engine, a training runner and a plain model built with routing replay, and two sampled completions."""
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout

    engine = NativeEngine.from_pretrained(tiny_dir["sdar_moe"])
    options = RuntimeOptions(routing_replay=True)
    wrapped, args = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout(), options)
    plain, _ = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout(), options)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, policy="low_confidence_static", steps=2,
                            stop_token_ids=())
    completions = engine.generate([[5, 6, 7], [11, 12, 13, 14, 15, 16]], params)
    samples = [Sample(c.prompt_ids, c.generated_ids, c.generated_reveal_steps, c.block_size, c.generated_logprobs,
                      advantage) for c, advantage in zip(completions, (1.0, -0.5))]
    return engine, Runner(wrap_for_training(wrapped), args), plain[0], args, samples


def engine_experts(engine, batch):
    return engine.routed_experts(batch.input_ids, batch.position_ids, batch.mask.dense())


def shifted(experts: dict, num_experts: int) -> dict:
    """Every token's experts moved to the next ones: still top-k distinct, different from any router's choice."""
    return {layer: (chosen + 1) % num_experts for layer, chosen in experts.items()}


def laid_rows(samples, mask_id, seed=0):
    estimator = build("trajectory", mask_id)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(samples))]
    rows, _ = estimator.rows(samples, generators)
    return rows_to_batch(rows, BLOCK)


def counted(laid):
    out = torch.zeros(laid.batch.size, laid.batch.seq_len, dtype=torch.bool)
    out[:, : laid.batch.seq_len // 2] = laid.pack(torch.ones(len(laid.places), laid.width)).bool()
    return out


def test_replaying_megatrons_own_choices_changes_nothing(replayable):
    """Megatron's recorded routing handed back as targets gives the same log-probs, bit for bit."""
    _, runner, _, args, samples = replayable
    laid = laid_rows(samples, args.diffusion.mask_token_id)
    with record_megatron_routing(runner.chunks) as record:
        free = noisy_log_probs(runner, laid, laid.batch.size)
    k = args.moe.topk
    laid.batch.experts = {layer: maps[0].transpose(0, 1).float().topk(k, dim=-1)[1] for layer, maps in record.items()}
    assert len(laid.batch.experts) == sum(args.moe.layer_pattern) > 0
    replayed = noisy_log_probs(runner, laid, laid.batch.size)
    assert torch.equal(free, replayed)


def test_the_replayed_experts_are_the_ones_used(replayable):
    """Shifted targets: Megatron's routers report exactly them (mismatch 0 against them, not against the engine's
    own choices), the log-probs move, and every micro-batch gets its own rows' targets."""
    engine, runner, _, args, samples = replayable
    laid = laid_rows(samples, args.diffusion.mask_token_id)
    own = engine_experts(engine, laid.batch)
    target = shifted(own, args.moe.num_experts)
    laid.batch.experts = target
    size = laid.batch.size
    assert size >= 4
    with record_megatron_routing(runner.chunks) as record:
        replayed = noisy_log_probs(runner, laid, 2)  # several micro-batches of several rows
    differ, total = mismatch_counts(record, target, counted(laid), 2)
    assert total > 0 and differ == 0
    differ_own, _ = mismatch_counts(record, own, counted(laid), 2)
    assert differ_own == total  # every counted token was moved off its own experts
    laid.batch.experts = None
    free = noisy_log_probs(runner, laid, 2)
    assert float((free - replayed).abs().max()) > 1e-3


def test_prepare_replays_the_engine_and_logs_no_mismatch(replayable):
    """prepare(replay=True): the old pass runs on the engine's experts, and the logged mismatch is 0."""
    engine, runner, _, args, samples = replayable
    estimator = build("trajectory", args.diffusion.mask_token_id)
    generators = [torch.Generator().manual_seed(i) for i in range(len(samples))]
    probe = lambda batch: shifted(engine_experts(engine, batch), args.moe.num_experts)  # noqa: E731
    prepared, routing = prepare(runner, estimator, samples, generators, LossConfig(), engine_routing=probe,
                                replay=True)
    assert routing["router_tokens"] > 0 and routing["router_differ"] == 0
    assert prepared.laid.batch.experts is not None
    _, without = prepare(runner, estimator, samples, [torch.Generator().manual_seed(i) for i in range(2)],
                         LossConfig(), engine_routing=probe, replay=False)
    assert without["router_differ"] == without["router_tokens"]  # the same probe, not replayed: all differ
    with pytest.raises(ValueError, match="engine_routing"):
        prepare(runner, estimator, samples, generators, LossConfig(), replay=True)


def test_replay_closes_the_gap_a_routing_disagreement_opens(replayable, tiny_dir):
    """An engine whose router weights differ a little (as kernels, dtypes and reduction orders make them differ
    in practice) picks other experts for some tokens. Unreplayed, the trainer's log-probs of the rows then stray
    from the engine's; replayed, the mismatch is 0 and the log-prob gap is smaller (what is left comes only from
    the gate values of the same experts)."""
    _, runner, _, args, samples = replayable
    engine = NativeEngine.from_pretrained(tiny_dir["sdar_moe"])
    noise = torch.Generator().manual_seed(11)
    for name, weight in engine.model.weights.items():
        if name.endswith("mlp.router.weight"):
            weight.add_(0.05 * weight.std() * torch.randn(weight.shape, generator=noise))
    laid = laid_rows(samples, args.diffusion.mask_token_id, seed=3)
    batch, n = laid.batch, laid.batch.seq_len // 2
    with torch.no_grad():
        logits = engine.model(batch.input_ids, batch.position_ids, batch.mask.dense().reshape(batch.size, 2 * n, 2 * n))
    rollout = laid.unpack(torch.log_softmax(logits, -1).gather(-1, batch.labels[..., None])[..., 0][:, :n])
    masked = laid.unpack((batch.input_ids[:, :n] == args.diffusion.mask_token_id).float()).bool()
    gaps, mismatch = {}, {}
    for mode in ("free", "replay"):
        batch.experts = engine_experts(engine, batch) if mode == "replay" else None
        with record_megatron_routing(runner.chunks) as record:
            lp = noisy_log_probs(runner, laid, batch.size)
        mismatch[mode] = mismatch_counts(record, engine_experts(engine, batch), counted(laid), batch.size)
        gaps[mode] = float((lp - rollout).abs()[masked].mean())
    assert mismatch["free"][0] > 0 and mismatch["replay"][0] == 0, mismatch
    assert gaps["replay"] < 0.5 * gaps["free"], gaps


def test_the_update_is_the_exact_gradient_under_the_replayed_routing(replayable):
    """main_grad after policy_gradient with replay equals autograd through a plain model run under the same
    replayed experts, and differs from the gradient under the model's own routing."""
    from dare_mega.models.runner import vocab_parallel_log_probs

    engine, runner, plain, args, samples = replayable
    estimator = build("trajectory", args.diffusion.mask_token_id)
    totals = Totals(len(samples), sum(s.length for s in samples))
    cfg = LossConfig()
    probe = lambda batch: shifted(engine_experts(engine, batch), args.moe.num_experts)  # noqa: E731
    generators = [torch.Generator().manual_seed(7 + i) for i in range(len(samples))]
    prepared, _ = prepare(runner, estimator, samples, generators, cfg, micro_batch_size=2, engine_routing=probe,
                          replay=True)
    for chunk in runner.chunks:
        chunk.zero_grad_buffer()
    policy_gradient(runner, estimator, samples, prepared, cfg, totals, micro_batch_size=2)

    laid = prepared.laid
    batch, n = laid.batch, laid.batch.seq_len // 2
    q_rollout = [torch.tensor(s.rollout_logprobs) for s in samples]

    def direct_grads(experts):
        plain.zero_grad()
        with replay_routing(plain, experts, sequence_parallel=False):
            logits = plain(batch.input_ids, batch.position_ids, batch.mask)
        lp = laid.unpack(vocab_parallel_log_probs(logits, batch.labels, args.vocab_size)[:, :n])
        loss, _ = estimator.loss(estimator.quantities(lp, prepared.plan), prepared.q_old, samples, cfg, totals,
                                 q_rollout=q_rollout)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in plain.parameters()]

    replayed, free = direct_grads(batch.experts), direct_grads(None)
    got = [p.main_grad for p in runner.chunks[0].module.parameters()]
    worst = max(float((g - e).abs().max()) for g, e in zip(got, replayed))
    apart = max(float((f - e).abs().max()) for f, e in zip(free, replayed))
    assert worst <= 1e-6 and apart > 1e-4, (worst, apart)


def test_replay_refuses_what_it_cannot_do(replayable, tiny_dir):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout

    engine, runner, plain, args, samples = replayable
    laid = laid_rows(samples, args.diffusion.mask_token_id)
    experts = engine_experts(engine, laid.batch)
    missing = dict(experts)
    missing.pop(max(missing))
    with pytest.raises(ConfigError, match=f"MoE layer {max(experts)}"):
        with replay_routing(plain, missing, sequence_parallel=False):
            pass
    unready, _ = build_from_hf(tiny_dir["sdar_moe"], ParallelLayout())
    with pytest.raises(ConfigError, match="routing_replay=True"):
        with replay_routing(unready[0], experts, sequence_parallel=False):
            pass
    with pytest.raises(ConfigError, match="recompute"):
        build_from_hf(tiny_dir["sdar_moe"], ParallelLayout(),
                      RuntimeOptions(routing_replay=True, recompute_granularity="full"))


def test_replay_config_is_checked():
    from dare_mega.config import load_config
    from dare_mega.trainer.config import RLConfig

    recipe = "configs/recipes/rl_tiny_sdar_moe.yaml"
    assert load_config(RLConfig, recipe, []).algorithm.routing_replay == "off"  # DARE's behaviour
    # YAML 1.2 booleans: `off` stays the choice's name (YAML 1.1 would read it as False); true/false still work
    cfg = load_config(RLConfig, recipe, ["algorithm.routing_replay=off", "logging.wandb=off",
                                         "algorithm.log_router_mismatch=false"])
    assert (cfg.algorithm.routing_replay, cfg.logging.wandb, cfg.algorithm.log_router_mismatch) == ("off", "off", False)
    with pytest.raises(ConfigError, match="routing_replay"):
        load_config(RLConfig, recipe, ["algorithm.routing_replay=always"])
    with pytest.raises(ConfigError, match="SGLang"):
        load_config(RLConfig, recipe, ["algorithm.routing_replay=rollout", "rollout.backend=sglang",
                                       "sglang.urls=[http://127.0.0.1:1]"])
