"""The phases of one RL step (trainer/rl.py runs them in order) and the held-out evaluation.

offload     train.offload: the optimizer state and gradient buffers leave the device (back before update)
rollout     this rank's whole groups of the step's prompts, decoded by the engine (weights of version step - 1)
score       rewards (each sample scored once, in the reward pool of its first model-parallel rank)
dynamic_sampling  rollout.filter: more rounds until enough groups have reward variance; this rank's kept slice
replay      SGLang rollouts for a step-map estimator: reveal steps and log-probs from the trainer's replay
advantages  group advantages -> estimator samples; the step's global totals (samples, tokens, rewards)
update      the policy update on Megatron (old / reference passes, then `epochs` optimizer steps)
sync        the engine gets the weights of version `step`
log         the step's record (reduced over data-parallel ranks by name)
save        a checkpoint every `checkpoint.every` steps and at the end

Everything random is seeded by (run seed, step, global index), so a step is the same at any layout and after
a resume.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dare_mega.config import to_dict
from dare_mega.rollout.masked_cache import cache_setting
from dare_mega.trainer.config import RLConfig

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
                          top_p=r.top_p, alg_temp=r.alg_temp, eps=r.eps, seeds=tuple(seeds),
                          logprob_temperature=likelihood_temperature(cfg),
                          confidence=None if r.confidence == "auto" else r.confidence)


def bench_sampling(cfg: RLConfig):
    """Greedy decoding with the rollout's policy, for benchmark files (their own default lengths)."""
    from dare_mega.rollout.types import SamplingParams

    def params(benchmark):
        return SamplingParams(max_new_tokens=cfg.eval.max_new_tokens or benchmark.max_new_tokens,
                              policy=cfg.rollout.policy, threshold=cfg.rollout.threshold, temperature=0.0)

    return params


def evaluate(job) -> dict:
    """Held-out accuracy: greedy, and the mean over `eval.samples` samples at the rollout's temperature with fixed
    seeds (what RL optimises). Each data-parallel replica decodes its share of the prompts (seeds by global
    index, so the numbers do not depend on the layout), its first model-parallel rank scores them, and the sums
    are reduced over every rank: all ranks return the same numbers."""
    from dare_mega.rewards import score_records
    from dare_mega.trainer.metrics import reduce_sums

    cfg, records, engine = job.cfg, job.inputs.heldout, job.engine
    replicas = dist.get_world_size(job.dp_group)
    lo, hi = (len(records) * job.dp_rank // replicas, len(records) * (job.dp_rank + 1) // replicas)
    k, total = cfg.eval.samples, len(records)

    def decode(indices, greedy):
        wanted = [records[i % total] for i in indices]
        params = sampling(cfg, indices if greedy else [10_000_019 + i for i in indices], greedy=greedy,
                          max_new_tokens=cfg.eval.max_new_tokens)
        if not wanted and not getattr(engine, "lockstep", False):
            return 0.0
        completions = engine.generate([r["prompt"] for r in wanted], params,
                                      cache=cache_setting(cfg.rollout.cache, cfg.rollout.masked_cache, job.args))
        if not wanted or not is_scorer():
            return 0.0
        return sum(o.score for o in score_records([c.text for c in completions], wanted, cfg.reward))

    def score(indices, greedy, largest_share):
        # eval.batch_size requests per call; every replica makes as many calls as the largest share needs
        # (lockstep engines decode together), the seeds stay those of the global indices
        size = cfg.eval.batch_size or max(largest_share, 1)
        return sum(decode(indices[start : start + size], greedy) for start in range(0, max(largest_share, 1), size))

    share = -(-total // replicas)
    sums = reduce_sums({"greedy": score(list(range(lo, hi)), True, share),
                        "sampled": score([j * total + i for j in range(k) for i in range(lo, hi)], False, share * k)},
                       None, job.env.device)
    return {"greedy": sums["greedy"] / total, "sampled": sums["sampled"] / (total * k)}


def is_scorer() -> bool:
    """Whether this rank scores its replica's requests (its first model-parallel rank)."""
    from megatron.core import parallel_state as ps

    return dist.get_rank() == dist.get_global_rank(ps.get_model_parallel_group(), 0)


@dataclass
class Rollout:
    step: int
    requests: list[dict]  # this rank's records, each repeated rollout.n times (whole groups)
    completions: list
    first: int  # this rank's first request in the step's global order


@dataclass
class Scored:
    """Per request: reward, tests passed, tests total, timed out ([n, 4] float64)."""

    values: torch.Tensor

    @property
    def rewards(self) -> torch.Tensor:
        return self.values[:, 0].clone()


@dataclass
class StepBatch:
    """The estimator's samples of this rank and the step's totals over data-parallel ranks."""

    samples: list
    totals: dict[str, float]


def rollout(job, step: int, round_: int = 0, drawn: set[int] | None = None) -> Rollout:
    """This rank's share of the step's prompts (round 0), or of a dynamic-sampling round's fresh prompts."""
    from dare_mega.trainer.dynamic_sampling import request_seed, round_prompts, share

    cfg, n, count = job.cfg, job.cfg.rollout.n, job.cfg.rollout.prompts_per_step
    train = job.inputs.train
    prompts = round_prompts(cfg.train.seed, step, round_, len(train), count, drawn or set())
    lo, hi = share(len(prompts), dist.get_world_size(job.dp_group), job.dp_rank)
    first = (round_ * count + lo) * n
    requests = [train[i] for i in prompts[lo:hi] for _ in range(n)]
    seeds = [request_seed(cfg.train.seed, step, first + k) for k in range(len(requests))]
    completions = []
    if requests or getattr(job.engine, "lockstep", False):  # lockstep engines decode together, even idle
        completions = job.engine.generate([r["prompt"] for r in requests], sampling(cfg, seeds),
                                          cache=cache_setting(cfg.rollout.cache, cfg.rollout.masked_cache, job.args))
    return Rollout(step, requests, completions, first)


def dynamic_sampling(job, first: Rollout, scored: Scored) -> tuple[Rollout, Scored, dict]:
    """rollout.filter=reward_variance (trainer/dynamic_sampling.py): more rounds until prompts_per_step groups
    with reward variance are drawn (or filter_max_rounds), then this rank's slice of the kept groups."""
    from dare_mega.trainer import dynamic_sampling as ds

    cfg, n, count = job.cfg, job.cfg.rollout.n, job.cfg.rollout.prompts_per_step
    train, step = job.inputs.train, first.step
    groups, drawn, rounds = [], set(), 0
    batch, values = first, scored
    while True:
        drawn |= set(ds.round_prompts(cfg.train.seed, step, rounds, len(train), count, drawn))
        mine = [ds.Group(batch.first // n + j, batch.requests[j * n : (j + 1) * n],
                         batch.completions[j * n : (j + 1) * n], values.values[j * n : (j + 1) * n])
                for j in range(len(batch.requests) // n)]
        everyone = [None] * dist.get_world_size(job.dp_group)
        dist.all_gather_object(everyone, mine, group=job.dp_group)
        groups += [g for part in everyone for g in part]
        rounds += 1
        if ds.enough(groups, count) or rounds >= cfg.rollout.filter_max_rounds or len(drawn) >= len(train):
            break
        batch = rollout(job, step, rounds, drawn)
        values = score(job, batch)
    kept, filled = ds.keep_informative(groups, count)
    lo, hi = ds.share(len(kept), dist.get_world_size(job.dp_group), job.dp_rank)
    mine = kept[lo:hi]
    requests = [r for g in mine for r in g.requests]
    completions = [c for g in mine for c in g.completions]
    values = torch.cat([g.values for g in mine]) if mine else torch.zeros(0, 4, dtype=torch.float64)
    stats = {"filter_kept_fraction": sum(g.informative for g in groups) / len(groups), "filter_rounds": rounds,
             "filter_filled": filled}
    return Rollout(step, requests, completions, lo * n), Scored(values), stats


def replay(job, batch: Rollout) -> tuple[Rollout, dict]:
    """Each token's reveal step and log-prob, which SGLang's responses lack, from a replay of the decoding on the
    trainer's shards (rollout/replay.py); every rank of a replica replays the same completions together.
    A step whose tokens disagree with the replay's beyond sglang.replay_max_mismatch stops the run."""
    from dare_mega.rollout.replay import replay as replay_trajectories
    from dare_mega.trainer.metrics import reduce_sums

    cfg, completions = job.cfg, batch.completions  # the same on every rank of a replica (rollout/replica.py)
    params = sampling(cfg, [c.seed for c in completions])
    completions, stats = replay_trajectories(job.replayer, completions, params, cfg.sglang.replay_logits_mb * 1024**2)
    sums = reduce_sums({"checked": stats.checked, "mismatched": stats.mismatched,
                        "samples_mismatched": stats.samples_mismatched, "samples": len(completions),
                        "forwards": stats.forwards}, job.dp_group, job.env.device)
    fraction = sums["mismatched"] / sums["checked"] if sums["checked"] else 0.0
    if fraction > cfg.sglang.replay_max_mismatch:
        raise RuntimeError(
            f"step {batch.step}: the trainer's replay of the SGLang rollouts chose another token than the servers for "
            f"{fraction:.1%} of {int(sums['checked'])} tokens (sglang.replay_max_mismatch="
            f"{cfg.sglang.replay_max_mismatch}): the servers decode with other weights or settings than the trainer's "
            f"model (a failed weight sync, another checkpoint, another --dllm-algorithm-config)")
    record = {"replay_mismatch": fraction,
              "replay_samples_mismatched": sums["samples_mismatched"] / max(sums["samples"], 1),
              "replay_forwards": sums["forwards"]}
    return Rollout(batch.step, batch.requests, completions, batch.first), record


def score(job, batch: Rollout) -> Scored:
    """The requests of a data-parallel rank are the same on all its tensor and pipeline ranks: its first
    model-parallel rank scores them (in the reward pool) and broadcasts, so a sandbox is run once per sample
    and every rank trains on the same rewards."""
    from megatron.core import parallel_state as ps

    from dare_mega.rewards import score_records

    group = ps.get_model_parallel_group()
    scorer = dist.get_global_rank(group, 0)
    values = torch.zeros(len(batch.requests), 4, dtype=torch.float64)
    if is_scorer():
        log = (lambda message: print(message, file=sys.stderr, flush=True)) if job.env.is_main else None
        outcomes = score_records([c.text for c in batch.completions], batch.requests, job.cfg.reward, log)
        values = torch.tensor([[o.score, o.tests_passed or 0, o.tests_total or 0, float(o.status == "timeout")]
                               for o in outcomes], dtype=torch.float64)
    values = values.to(job.env.device)
    if dist.get_world_size(group) > 1:
        dist.broadcast(values, src=scorer, group=group)
    return Scored(values.cpu())


def advantages(job, batch: Rollout, scored: Scored) -> StepBatch:
    from dare_mega.algorithms.estimators import Sample
    from dare_mega.algorithms.policy import group_advantages
    from dare_mega.trainer.metrics import reduce_sums

    a, n = job.cfg.algorithm, job.cfg.rollout.n
    rewards = scored.rewards
    adv = group_advantages(rewards, [k // n for k in range(len(batch.requests))], a.advantage, a.std_normalize,
                           std=a.std, group_of_one=a.group_of_one)
    masked = job.args.diffusion.attention == "full"  # blocks counted from the end of the prompt
    samples = [Sample(c.prompt_ids, c.generated_ids, c.generated_reveal_steps, c.block_size, c.generated_logprobs,
                      float(v), masked_diffusion=masked) for c, v in zip(batch.completions, adv)]
    passed, tests, timeouts = scored.values[:, 1:].sum(0).tolist()
    totals = reduce_sums({"samples": len(samples), "tokens": sum(s.length for s in samples),
                          "reward": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()),
                          "completion_tokens": float(sum(len(c.completion_ids) for c in batch.completions)),
                          "tests_passed": passed, "tests": tests, "timeouts": timeouts}, job.dp_group, job.env.device)
    return StepBatch(samples, totals)


def offload(job) -> None:
    """train.offload: the optimizer state and gradient buffers leave the device until `reload`."""
    if job.offload is not None:
        job.offload.offload()


def reload(job) -> None:
    if job.offload is not None:
        job.offload.reload()


def update(job, batch: Rollout, step_batch: StepBatch) -> dict:
    """One policy update; `seconds_logprob` in the result is the old / reference passes' share of its time."""
    from dare_mega.algorithms.estimators import Totals
    from dare_mega.algorithms.rl import policy_update

    cfg, a = job.cfg, job.cfg.algorithm
    seed, step, first, count = cfg.train.seed, batch.step, batch.first, len(step_batch.samples)

    def noise(epoch):  # per sample, per epoch: any layout alike
        return [torch.Generator().manual_seed(seed * 104_729 + step * 100_003 + first + k + epoch * EPOCH_SEED_STRIDE)
                for k in range(count)]

    totals = step_batch.totals
    layout = job.inputs.layout
    stats = policy_update(job.runner, job.optimizer, job.estimator, step_batch.samples, noise, job.loss_cfg,
                          Totals(int(totals["samples"]), int(totals["tokens"])), cfg.train.micro_batch_size, a.epochs,
                          job.ref_runner, sp_multiple=layout.tp if layout.sp else 1,
                          temperature=likelihood_temperature(cfg), engine_routing=job.routing_probe,
                          pack_tokens=cfg.train.pack_tokens or None, replay=job.replay,
                          log_mismatch=a.log_router_mismatch)
    job.scheduler.step(1)
    return stats


def sync(job, step: int) -> None:
    job.weights.sync(step)


def log(job, step: int, lr: float, step_batch: StepBatch, stats: dict, times: dict, extra: dict | None = None) -> dict:
    """The step's record: rewards and lengths from the totals, the loss's statistics summed over data-parallel
    ranks by name, the routing counts over every rank (each counts its own tokens and layers)."""
    from dare_mega.rewards import CODE_REWARDS
    from dare_mega.trainer.metrics import reduce_sums

    device, totals = job.env.device, step_batch.totals
    local = reduce_sums({k: stats[k] for k in ("loss", "clipped", "units", "kl", "rollout_gap", "tis_tokens",
                                              "tis_truncated")}, job.dp_group, device)
    router = reduce_sums({"differ": stats.get("router_differ", 0), "tokens": stats.get("router_tokens", 0)},
                         None, device)
    count, mean = totals["samples"], totals["reward"] / totals["samples"]
    seconds = sum(times.values())
    record = {
        "step": step, "loss": local["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
        "reward_mean": mean, "reward_std": max(totals["reward_sq"] / count - mean**2, 0.0) ** 0.5,
        "accuracy": mean if not set(job.inputs.reward_names) & set(CODE_REWARDS) else None,
        "response_length": totals["completion_tokens"] / count,
        "tests_passed": totals["tests_passed"] / totals["tests"] if totals["tests"] else None,
        "reward_timeouts": totals["timeouts"] / count,
        "clip_fraction": local["clipped"] / max(local["units"], 1), "kl": local["kl"] / count,
        "rollout_train_gap": local["rollout_gap"] / max(local["tis_tokens"], 1),
        "tis_truncated": local["tis_truncated"] / max(local["tis_tokens"], 1),
        "router_mismatch": router["differ"] / router["tokens"] if router["tokens"] else None,
        "padding": stats["padding"], "tokens_per_s": totals["completion_tokens"] / seconds, "seconds": seconds,
        "weight_version": step,
        **{f"time_{k}": times[k] for k in ("offload", "rollout", "reward", "logprob", "update", "weight_refresh")},
    }
    record.update(extra or {})  # rollout.filter's kept fraction, rounds and fill
    cfg = job.cfg
    if cfg.eval.every and step % cfg.eval.every == 0:
        from dare_mega.eval.scoring import score_benchmarks

        record.update({f"heldout_{k}": v for k, v in evaluate(job).items()})
        record.update({f"bench_{k}": v for k, v in score_benchmarks(job.engine, job.inputs.benchmarks,
                                                                    bench_sampling(cfg), cfg.reward).items()})
    job.metrics.log(record)
    return record


def save(job, step: int) -> None:
    from dare_mega.trainer import checkpoint as ckpt

    cfg = job.cfg
    if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
        ckpt.save(job.checkpoint_dir, step, job.chunks, job.optimizer, job.scheduler, {"step": step}, job.meta,
                  job.assets, {"config": to_dict(cfg)}, cfg.checkpoint.keep)
