"""RL for diffusion LLMs on Megatron-Core: `python -m dare_mega.trainer.rl --config FILE [section.key=value ...]`

One step, as data:
  prompts (this rank's share of the step's groups) -> native engine (weights of version v) -> completions with
  trajectories -> rewards -> group advantages -> estimator rows -> policy update on Megatron -> weights into the
  engine (version v + 1) -> next step.
Rollouts are sharded over data-parallel ranks (whole groups per rank); tensor/pipeline ranks of one
data-parallel group decode the same requests with the same seeds. Everything random is seeded by
(run seed, step, global index), so a step is the same at any layout and after a resume.
"""

from __future__ import annotations

import os
import random
import sys

import torch
import torch.distributed as dist

from dare_mega.config import load_config, to_dict
from dare_mega.errors import ConfigError, exit_status
from dare_mega.trainer.config import RLConfig


def task_records(cfg: RLConfig):
    """(train records, held-out records, the rewards they use). Every record names its reward in `_reward`:
    task.reward when set, else its own (verl / DARE layout: from extra_info.task or data_source), else the
    task's; a record missing what its reward needs is named by file and line (or row) here, before any model."""
    from dare_mega.data.tasks import TASK_REWARDS, make_task
    from dare_mega.rewards import check_fields

    if cfg.task.name == "file":
        from dare_mega.data.records import read_records, rl_record

        records = [rl_record(r, cfg.task.reward) for r in read_records(cfg.task.train)]
        default = cfg.task.reward or "math"
        heldout, train = records[: cfg.task.heldout], records[cfg.task.heldout :]
    else:
        train = make_task(cfg.task.name, cfg.task.train_prompts, seed=cfg.task.seed)
        heldout = make_task(cfg.task.name, cfg.task.heldout, seed=cfg.task.seed + 1_000_003,
                            exclude={r["prompt"] for r in train})
        default = cfg.task.reward or TASK_REWARDS[cfg.task.name]
    if not train:
        raise ConfigError("task: no training prompts left after the held-out split")
    for i, record in enumerate(train + heldout):
        where = record.get("_source", f"record {i}")
        if "prompt" not in record or not record["prompt"]:
            raise ConfigError(f"{where}: needs a 'prompt'")
        record["_reward"] = cfg.task.reward or record.get("_reward") or default
        check_fields(record["_reward"], record, where)
    return train, heldout, sorted({r["_reward"] for r in train + heldout})


EPOCH_SEED_STRIDE = 1_000_000_000_039  # epoch e's noise: seeds shifted past every (step, sample) of a run


def likelihood_temperature(cfg: RLConfig) -> float:
    """What the losses divide the logits by: 1 (raw logits, DARE's block-diffusion actors) or the sampling
    temperature (the distribution that sampled)."""
    if cfg.algorithm.likelihood == "raw" or cfg.rollout.temperature <= 0:
        return 1.0
    return cfg.rollout.temperature


def sampling(cfg: RLConfig, seeds, greedy: bool = False, max_new_tokens: int | None = None):
    """The rollout's decoding; its recorded log-probs use the trainer's likelihood, so that the importance
    weights compare like with like."""
    from dare_mega.rollout.types import SamplingParams

    r = cfg.rollout
    return SamplingParams(max_new_tokens=max_new_tokens or r.max_new_tokens, policy=r.policy, steps=r.steps,
                          threshold=r.threshold, temperature=0.0 if greedy else r.temperature, top_k=r.top_k,
                          top_p=r.top_p, seeds=tuple(seeds), logprob_temperature=likelihood_temperature(cfg))


def evaluate(engine, records, cfg: RLConfig) -> dict:
    """Held-out accuracy: greedy, and the mean over `eval.samples` samples at the rollout's temperature with fixed
    seeds (what RL optimises). Every rank computes the same numbers."""
    from dare_mega.rewards import score_records

    def accuracy(completions, records):
        outcomes = score_records([c.text for c in completions], records, cfg.reward)
        return sum(o.score for o in outcomes) / len(outcomes)

    prompts = [r["prompt"] for r in records]
    greedy = engine.generate(prompts, sampling(cfg, range(len(records)), greedy=True,
                                               max_new_tokens=cfg.eval.max_new_tokens), cache=cfg.rollout.cache)
    k = cfg.eval.samples
    sampled = engine.generate(prompts * k, sampling(cfg, [10_000_019 + i for i in range(len(records) * k)],
                                                    max_new_tokens=cfg.eval.max_new_tokens), cache=cfg.rollout.cache)
    return {"greedy": accuracy(greedy, records), "sampled": accuracy(sampled, records * k)}


def step_rewards(completions, requests, cfg: RLConfig, log, device) -> torch.Tensor:
    """[n, 4] float64: reward, tests passed, tests total, timed out, per request. The requests of a data-parallel
    rank are the same on all its tensor and pipeline ranks: its first model-parallel rank scores them (in the
    reward pool) and broadcasts, so a sandbox is run once per sample and every rank trains on the same rewards."""
    from megatron.core import parallel_state as ps

    from dare_mega.rewards import score_records

    group = ps.get_model_parallel_group()
    scorer = dist.get_global_rank(group, 0)
    values = torch.zeros(len(requests), 4, dtype=torch.float64)
    if dist.get_rank() == scorer:
        outcomes = score_records([c.text for c in completions], requests, cfg.reward, log)
        values = torch.tensor([[o.score, o.tests_passed or 0, o.tests_total or 0, float(o.status == "timeout")]
                               for o in outcomes], dtype=torch.float64)
    values = values.to(device)
    if dist.get_world_size(group) > 1:
        dist.broadcast(values, src=scorer, group=group)
    return values.cpu()


def bench_sampling(cfg: RLConfig):
    """Greedy decoding with the rollout's policy, for benchmark files (their own default lengths)."""
    from dare_mega.rollout.types import SamplingParams

    def params(benchmark):
        return SamplingParams(max_new_tokens=cfg.eval.max_new_tokens or benchmark.max_new_tokens,
                              policy=cfg.rollout.policy, threshold=cfg.rollout.threshold, temperature=0.0)

    return params


def run(cfg: RLConfig, rollout_backend=None) -> dict:
    """`rollout_backend(cfg, hf_dir, env) -> (engine, transport)`: where rollouts run and how weights reach them
    (default: native_rollout; the Ray launcher passes remote engine actors)."""
    from megatron.core import parallel_state as ps

    from dare_mega.algorithms.estimators import ESTIMATORS, Sample, Totals, build
    from dare_mega.algorithms.policy import LossConfig, group_advantages
    from dare_mega.algorithms.rl import policy_update
    from dare_mega.checkpoint.torch_dist import load_into
    from dare_mega.eval.scoring import score_benchmarks
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import destroy_distributed, init_distributed, init_model_parallel
    from dare_mega.rewards import CODE_REWARDS, prepare
    from dare_mega.trainer import checkpoint as ckpt
    from dare_mega.trainer.backends import native_rollout, sglang_rollout
    from dare_mega.trainer.metrics import Metrics, reduce_sums, timed
    from dare_mega.trainer.setup import (
        build_optimizer,
        checkpoint_dir,
        ensure_model_dir,
        params_dtype,
        preflight,
        resume_path,
        training_meta,
    )
    from dare_mega.weight_sync.export import WeightExporter
    from dare_mega.weight_sync.sync import WeightSync

    train, heldout, reward_names = task_records(cfg)

    # a code reward's sandbox is checked (or refused, naming what is missing) before any model or process group
    def announce(message):
        print(message, file=sys.stderr, flush=True)

    where = "; ".join(prepare(name, cfg.reward, log=announce) for name in reward_names)
    if cfg.eval.tasks:
        from dare_mega.eval.benchmarks import BENCHMARKS

        for name in dict.fromkeys(BENCHMARKS[t].reward for t in cfg.eval.tasks if t in BENCHMARKS):
            prepare(name, cfg.reward, log=announce)
    hf_dir = ensure_model_dir(cfg)
    args, layout = preflight(cfg, hf_dir, int(os.environ.get("WORLD_SIZE", "1")))
    replay = cfg.algorithm.routing_replay == "rollout"
    if replay and not args.moe:
        raise ConfigError(f"algorithm.routing_replay=rollout: {args.architecture} ({hf_dir}) has no MoE routers to "
                          "replay; use routing_replay=off")
    benchmarks = {}
    if cfg.eval.tasks:  # benchmark files are read (and a missing one named) before any process group exists
        from dare_mega.eval.benchmarks import load

        data = cfg.eval.data or os.environ.get("COMPASS_DATA_CACHE")
        if not data:
            raise ConfigError("eval.tasks needs eval.data (or $COMPASS_DATA_CACHE): the directory of benchmark files")
        benchmarks = {task: load(task, data, cfg.eval.limit) for task in cfg.eval.tasks}
    if cfg.rollout.backend == "sglang":  # what SGLang cannot train is refused before any process group exists
        from dare_mega.rollout.sglang_engine import SGLangServerConfig, check_usable

        check_usable(SGLangServerConfig(hf_dir, dllm_algorithm=cfg.sglang.dllm_algorithm), cfg.algorithm.estimator,
                     ESTIMATORS[cfg.algorithm.estimator].needs, cfg.rollout.temperature, cfg.rollout.n,
                     sorted(n for n, e in ESTIMATORS.items() if "step_maps" not in e.needs))
    env = init_distributed()
    init_model_parallel(layout, seed=cfg.train.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if cfg.rollout.prompts_per_step % dp:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not divisible by the "
                          f"{dp} data-parallel ranks")
    dtype = params_dtype(cfg.model.dtype, env.device)
    bias_rate = 0.0 if cfg.algorithm.freeze_expert_bias else cfg.algorithm.expert_bias_update_rate
    chunks, args = build_from_hf(hf_dir, layout, RuntimeOptions(params_dtype=dtype, expert_bias_update_rate=bias_rate,
                                                                routing_replay=replay),
                                 cfg.model.mask_token_id, cfg.model.block_size)
    if cfg.model.init:
        load_into(chunks, cfg.model.init)
    table = mapping_for(args)
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(cfg, chunks, dtype)
    runner = Runner(chunks, args)
    backend = rollout_backend or (sglang_rollout if cfg.rollout.backend == "sglang" else native_rollout)
    engine, transport = backend(cfg, hf_dir, env)
    check = None
    if cfg.rollout.backend == "sglang" and cfg.sglang.check_weights:
        from dare_mega.weight_sync.sync import SGLangWeightCheck

        check = SGLangWeightCheck(transport.clients)
    weights = WeightSync(WeightExporter(chunks, args, table, cfg.rollout.sync_bucket_mb * 1024**2), transport,
                         check=check, check_names=[n for b in table.bindings() if b.layer is None for n in b.hf_names])
    weights.sync(0)

    ckpt_dir = checkpoint_dir(cfg)
    start = 0
    path = resume_path(cfg)
    if path:
        start, _ = ckpt.load(path, chunks, optimizer, scheduler)
        weights.sync(start)
    meta, assets = training_meta(hf_dir, args, layout, dtype, cfg.run_dir, env)

    a = cfg.algorithm
    estimator = build(a.estimator, args.diffusion.mask_token_id, a.options)
    loss_cfg = LossConfig(a.eps_low, a.eps_high, a.dual_clip, a.kl_coef, a.kl_kind, a.tis_cap)
    ref_runner = None
    if a.kl_coef:
        ref_chunks, _ = build_from_hf(hf_dir, layout, RuntimeOptions(params_dtype=dtype, routing_replay=replay),
                                      cfg.model.mask_token_id, cfg.model.block_size)
        if cfg.model.init:
            load_into(ref_chunks, cfg.model.init)
        ref_runner = Runner(ref_chunks, args)
    metrics = Metrics(cfg.run_dir, cfg.logging, cfg.train.steps, start, env.is_main, to_dict(cfg), "rl",
                      ("reward_mean", "loss", "clip_fraction", "tokens_per_s"))
    before = evaluate(engine, heldout, cfg)
    if env.is_main:
        print(f"rl: {args.architecture} at {layout.describe()} on {env.world_size} process(es); task {cfg.task.name} "
              f"({where}), estimator {estimator.describe(block_diffusion=True)}; likelihood {a.likelihood}; "
              f"routing replay {a.routing_replay if args.moe else 'n/a (dense)'}; "
              f"rollouts on {type(engine).__name__}; "
              f"held-out accuracy {before}; "
              f"starting at step {start}", flush=True)
    per_rank = cfg.rollout.prompts_per_step // dp
    routing_probe = None  # the engine's experts for the trainer's rows: to compare with Megatron's, or replay
    if replay and not hasattr(engine, "routed_experts"):
        raise ConfigError(f"algorithm.routing_replay=rollout: the rollout engine ({type(engine).__name__}) cannot "
                          "report its expert choices; use routing_replay=off")
    if (a.log_router_mismatch or replay) and args.moe and hasattr(engine, "routed_experts"):
        def routing_probe(batch):
            return engine.routed_experts(batch.input_ids, batch.position_ids, batch.mask.dense())
    n = cfg.rollout.n
    dp_group = ps.get_data_parallel_group()
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if env.is_main else None
    for step in range(start + 1, cfg.train.steps + 1):
        times = {}
        with timed(times, "rollout"):  # this rank's whole groups, seeded by their global index
            chosen = random.Random(cfg.train.seed * 1_000_003 + step).sample(range(len(train)),
                                                                           cfg.rollout.prompts_per_step)
            mine = chosen[dp_rank * per_rank : (dp_rank + 1) * per_rank]
            first = dp_rank * per_rank * n  # this rank's first request in the step's global order
            requests = [train[i] for i in mine for _ in range(n)]
            seeds = [cfg.train.seed * 7919 + step * 100_003 + first + k for k in range(len(requests))]
            completions = engine.generate([r["prompt"] for r in requests], sampling(cfg, seeds),
                                          cache=cfg.rollout.cache)
        with timed(times, "reward"):  # scores, then group advantages
            scored = step_rewards(completions, requests, cfg, log, env.device)
            rewards = scored[:, 0].clone()
            advantages = group_advantages(rewards, [k // n for k in range(len(requests))], a.advantage,
                                          a.std_normalize, std=a.std, group_of_one=a.group_of_one)
        samples = [Sample(c.prompt_ids, c.generated_ids, c.generated_reveal_steps, c.block_size,
                          c.generated_logprobs, float(adv)) for c, adv in zip(completions, advantages)]
        passed, tests, timeouts = scored[:, 1:].sum(0).tolist()
        totals = reduce_sums({"samples": len(samples), "tokens": sum(s.length for s in samples),
                              "reward": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()),
                              "completion_tokens": float(sum(len(c.completion_ids) for c in completions)),
                              "tests_passed": passed, "tests": tests, "timeouts": timeouts}, dp_group, env.device)

        def noise(epoch, step=step, first=first, count=len(samples)):  # per sample, per epoch: any layout alike
            return [torch.Generator().manual_seed(cfg.train.seed * 104_729 + step * 100_003 + first + k
                                                  + epoch * EPOCH_SEED_STRIDE) for k in range(count)]

        lr = optimizer.param_groups[0]["lr"]
        with timed(times, "update"):  # the old/ref passes ("logprob") and the optimizer steps
            stats = policy_update(runner, optimizer, estimator, samples, noise, loss_cfg,
                                  Totals(int(totals["samples"]), int(totals["tokens"])), cfg.train.micro_batch_size,
                                  a.epochs, ref_runner, sp_multiple=layout.tp if layout.sp else 1,
                                  temperature=likelihood_temperature(cfg), engine_routing=routing_probe,
                                  pack_tokens=cfg.train.pack_tokens or None, replay=replay,
                                  log_mismatch=a.log_router_mismatch)
            scheduler.step(1)
        times["logprob"] = stats["seconds_logprob"]
        times["update"] -= times["logprob"]
        with timed(times, "weight_refresh"):  # the engine gets version `step`
            weights.sync(step)
        local = reduce_sums({k: stats[k] for k in ("loss", "clipped", "units", "kl", "rollout_gap", "tis_tokens",
                                                  "tis_truncated")}, dp_group, env.device)
        # routing counts: every rank counts its own tokens and layers (DP rows, SP slices, PP stages)
        router = reduce_sums({"differ": stats.get("router_differ", 0), "tokens": stats.get("router_tokens", 0)},
                             None, env.device)
        count, mean = totals["samples"], totals["reward"] / totals["samples"]
        seconds = sum(times.values())
        record = {
            "step": step, "loss": local["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
            "reward_mean": mean, "reward_std": max(totals["reward_sq"] / count - mean**2, 0.0) ** 0.5,
            "accuracy": mean if not set(reward_names) & set(CODE_REWARDS) else None,
            "response_length": totals["completion_tokens"] / count,
            "tests_passed": totals["tests_passed"] / totals["tests"] if totals["tests"] else None,
            "reward_timeouts": totals["timeouts"] / count,
            "clip_fraction": local["clipped"] / max(local["units"], 1), "kl": local["kl"] / count,
            "rollout_train_gap": local["rollout_gap"] / max(local["tis_tokens"], 1),
            "tis_truncated": local["tis_truncated"] / max(local["tis_tokens"], 1),
            "router_mismatch": router["differ"] / router["tokens"] if router["tokens"] else None,
            "padding": stats["padding"], "tokens_per_s": totals["completion_tokens"] / seconds, "seconds": seconds,
            "weight_version": step,
            **{f"time_{k}": times[k] for k in ("rollout", "reward", "logprob", "update", "weight_refresh")},
        }
        if cfg.eval.every and step % cfg.eval.every == 0:
            record.update({f"heldout_{k}": v for k, v in evaluate(engine, heldout, cfg).items()})
            record.update({f"bench_{k}": v for k, v in score_benchmarks(engine, benchmarks, bench_sampling(cfg),
                                                                        cfg.reward).items()})
        metrics.log(record)
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
            ckpt.save(ckpt_dir, step, chunks, optimizer, scheduler, {"step": step}, meta, assets,
                      {"config": to_dict(cfg)}, cfg.checkpoint.keep)
        if cfg.train.stop_after is not None and step >= cfg.train.stop_after:
            break
    after = evaluate(engine, heldout, cfg)
    metrics.close()
    if env.is_main:
        print(f"held-out greedy accuracy {before['greedy']:.4f} -> {after['greedy']:.4f}", flush=True)
        print(f"accuracy_before_rl={before[cfg.eval.metric]:.4f} accuracy_after_rl={after[cfg.eval.metric]:.4f} "
              f"heldout={len(heldout)}", flush=True)
    destroy_distributed()
    return {"before": before, "after": after}


def main(argv=None) -> int:
    from dare_mega.trainer.setup import parse_args

    path, overrides = parse_args("python -m dare_mega.trainer.rl", __doc__, argv)
    return exit_status(lambda: run(load_config(RLConfig, path, overrides)))


if __name__ == "__main__":
    sys.exit(main())
