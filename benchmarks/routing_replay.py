#!/usr/bin/env python
"""MoE routing replay on the tiny run: the router mismatch and the rollout/train log-prob gap, with and without.

    python benchmarks/routing_replay.py [--steps 12] [--dtype bfloat16] [--init CHECKPOINT]

The default example's RL (configs/recipes/rl_tiny_sdar_moe.yaml: tiny SDAR-MoE, task `max`, trajectory
estimator, one process) from its SFT warm-up (30 steps, run here unless `--init` names a torch_dist checkpoint),
once with `algorithm.routing_replay=off` and once with `rollout`. The trainer runs in `--dtype` while the
native engine stays float32, as on a GPU where the two run different kernels and precisions: in float32 on a
CPU they route identically and there is nothing to replay. Per variant, over the steps: the mean and last
router mismatch (the fraction of (token, MoE layer) pairs whose experts differ between the engine and the
trainer's old-log-prob pass), the mean and last rollout/train gap (mean |log p_train - log p_rollout| over the
replayed tokens) and the seconds of the log-prob phase. Result: benchmarks/results/routing_replay-<device>.json;
docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(module: str, overrides: list[str], args) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
               str(args.port), "-m", module, *overrides, "logging.progress=false"]
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{module} failed:\n{proc.stderr[-4000:]}")


def summary(run_dir: str) -> dict:
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
    return {"router_mismatch_mean": mean("router_mismatch"), "router_mismatch_last": steps[-1]["router_mismatch"],
            "gap_mean": mean("rollout_train_gap"), "gap_first": steps[0]["rollout_train_gap"],
            "gap_last": steps[-1]["rollout_train_gap"], "logprob_s": mean("time_logprob"),
            "reward_last": steps[-1]["reward_mean"], "steps": len(steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--init", help="an SFT checkpoint to start from (default: run the example's warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--port", type=int, default=29541)
    p.add_argument("--out", help="where the result goes (default benchmarks/results/routing_replay-<device>.json)")
    args = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        init = args.init
        if not init:
            launch("dare_mega.trainer.sft", ["--config", "configs/recipes/sft_tiny_sdar_moe.yaml",
                                             f"run_dir={workdir}/sft", "data.task=max", "data.synthetic_samples=512",
                                             "train.steps=30", "checkpoint.every=30", "optim.warmup_steps=5"], args)
            init = sorted(glob.glob(f"{workdir}/sft/checkpoints/step_*"))[-1]
        for replay in ("off", "rollout"):
            run_dir = os.path.join(workdir, f"rl_{replay}")
            launch("dare_mega.trainer.rl", ["--config", "configs/recipes/rl_tiny_sdar_moe.yaml", f"run_dir={run_dir}",
                                            f"model.init={init}", f"model.dtype={args.dtype}",
                                            f"train.steps={args.steps}", f"algorithm.routing_replay={replay}",
                                            "task.heldout=4", "eval.samples=1", "checkpoint.every=100000"], args)
            results[replay] = r = summary(run_dir)
            print(f"replay {replay:8s} mismatch mean {r['router_mismatch_mean']:.4%} last {r['router_mismatch_last']:.4%}"
                  f"  gap mean {r['gap_mean']:.5f} first {r['gap_first']:.5f} last {r['gap_last']:.5f}"
                  f"  log-prob phase {r['logprob_s']:.2f} s", flush=True)
    from _results import device_name, write_result

    write_result("routing_replay", {"device": device_name(args.threads), "settings": vars(args),
                                    "variants": results}, args.out)

if __name__ == "__main__":
    main()
