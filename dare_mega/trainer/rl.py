"""RL for diffusion LLMs on Megatron-Core: `python -m dare_mega.trainer.rl --config FILE [section.key=value ...]`

The loop, as in slime's train loop: set-up (trainer/rl_setup.py), then per step the named phases of
trainer/rl_phases.py: [offload] -> rollout (this rank's whole groups, engine weights of version step - 1) -> score
-> [dynamic sampling] -> [replay] -> advantages -> [reload] -> update (on Megatron) -> sync (the engine gets
version step) -> log -> save; the bracketed phases only with train.offload / rollout.filter / SGLang rollouts
for an estimator that needs step maps. Rollouts are sharded over
data-parallel ranks: with the native engine, the first rank of each replica decodes and its tensor / pipeline
ranks receive the completions; on the Megatron backend all ranks of a replica decode together.
"""

from __future__ import annotations

import sys

from dare_mega.config import load_config
from dare_mega.errors import exit_status
from dare_mega.trainer import rl_phases as phase
from dare_mega.trainer.config import RLConfig
from dare_mega.trainer.metrics import timed
from dare_mega.trainer.rl_setup import setup


def run(cfg: RLConfig, rollout_backend=None) -> dict:
    """`rollout_backend(cfg, hf_dir, env) -> (engine, transport)`: where rollouts run (rl_setup.setup)."""
    from dare_mega.parallel import destroy_distributed

    job = setup(cfg, rollout_backend)
    before = phase.evaluate(job)
    announce(job, before)
    for step in range(job.start + 1, cfg.train.steps + 1):
        times = {}
        with timed(times, "offload"):  # train.offload: optimizer state and gradients off the device
            phase.offload(job)
        with timed(times, "rollout"):
            rollout = phase.rollout(job, step)
        with timed(times, "reward"):
            scored = phase.score(job, rollout)
        sampled = {}
        if cfg.rollout.filter != "none":
            with timed(times, "rollout"):  # the further rounds (decoding and scoring) and the selection
                rollout, scored, sampled = phase.dynamic_sampling(job, rollout, scored)
        if job.replayer is not None:  # SGLang's responses have tokens only: the trainer replays the steps
            with timed(times, "replay"):
                rollout, replayed = phase.replay(job, rollout)
            sampled.update(replayed, time_replay=times["replay"])
        with timed(times, "reward"):
            batch = phase.advantages(job, rollout, scored)
        with timed(times, "offload"):
            phase.reload(job)
        lr = job.optimizer.param_groups[0]["lr"]
        with timed(times, "update"):
            stats = phase.update(job, rollout, batch)
        times["logprob"] = stats["seconds_logprob"]  # the old / reference passes, inside the update
        times["update"] -= times["logprob"]
        with timed(times, "weight_refresh"):
            phase.sync(job, step)
        phase.log(job, step, lr, batch, stats, times, sampled)
        phase.save(job, step)
        if cfg.train.stop_after is not None and step >= cfg.train.stop_after:
            break
    after = phase.evaluate(job)
    job.metrics.close()
    if job.env.is_main:
        print(f"held-out greedy accuracy {before['greedy']:.4f} -> {after['greedy']:.4f}", flush=True)
        print(f"accuracy_before_rl={before[cfg.eval.metric]:.4f} accuracy_after_rl={after[cfg.eval.metric]:.4f} "
              f"heldout={len(job.inputs.heldout)}", flush=True)
    destroy_distributed()
    return {"before": before, "after": after}


def announce(job, before: dict) -> None:
    import torch.distributed as dist

    from dare_mega.rollout.replica import ReplicaEngine

    if job.env.is_main:
        a, args = job.cfg.algorithm, job.args
        block_diffusion = args.diffusion.attention != "full"
        engine = type(job.engine).__name__
        if isinstance(job.engine, ReplicaEngine):  # rank 0 leads its replica
            engine = (f"{type(job.engine.engine).__name__}, one per data-parallel replica "
                      f"({dist.get_world_size(job.dp_group)} for {job.env.world_size} ranks)")
        print(f"rl: {args.architecture} at {job.inputs.layout.describe()} on {job.env.world_size} process(es); "
              f"task {job.cfg.task.name} ({job.inputs.sandboxes}), estimator "
              f"{job.estimator.describe(block_diffusion=block_diffusion)}; likelihood {a.likelihood}; "
              f"routing replay {a.routing_replay if args.moe else 'n/a (dense)'}; "
              f"rollouts on {engine}; held-out accuracy {before}; starting at step {job.start}",
              flush=True)


def main(argv=None) -> int:
    from dare_mega.trainer.setup import parse_args

    path, overrides = parse_args("python -m dare_mega.trainer.rl", __doc__, argv)
    return exit_status(lambda: run(load_config(RLConfig, path, overrides)))


if __name__ == "__main__":
    sys.exit(main())
