#!/usr/bin/env python
"""One RL step, phase by phase, and the cached + packed pipeline against the no-cache + padded one.

    python benchmarks/rl_step.py [--steps 3] [--prompts 4] [--n 4] [--max-new-tokens 64] [--estimator trajectory]

Runs the real trainer (`python -m dare_mega.trainer.rl`, one process) on a small SDAR-MoE made by the script
(random weights: every completion runs to its length limit or a sampled end-of-text, so lengths vary as in
real RL), for each variant:

  cached+packed    rollout with the block KV cache; estimator rows packed into sequences (train.pack_tokens)
  cached+padded    the cache, rows padded to the longest (one row per sequence)
  nocache+padded   no cache (every denoising forward recomputes the whole prefix), rows padded

and reads the per-phase times (rollout, reward, logprob, update, weight_refresh) from metrics.jsonl, skipping
the first step (warm-up). Result: benchmarks/results/rl_step-<device>.json; docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PHASES = ("rollout", "reward", "logprob", "update", "weight_refresh")
VARIANTS = {
    # sequences as long as the longest row: never longer than padded ones (SDPA on a CPU computes every score
    # of a sequence, so longer packed sequences cost more there; FlexAttention on GPUs skips masked blocks)
    "cached+packed": ["rollout.cache=true", "train.pack_tokens=1", "train.micro_batch_size=4"],
    "cached+padded": ["rollout.cache=true", "train.pack_tokens=0", "train.micro_batch_size=4"],
    "nocache+padded": ["rollout.cache=false", "train.pack_tokens=0", "train.micro_batch_size=4"],
}


def model_config() -> dict:
    from _models import small_sdar_moe

    return small_sdar_moe()


def run_variant(name: str, hf: str, workdir: str, args) -> dict:
    run_dir = os.path.join(workdir, name.replace("+", "_"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
               str(args.port), "-m", "dare_mega.trainer.rl", "--config", "configs/recipes/rl_tiny_sdar_moe.yaml",
               f"run_dir={run_dir}", f"model.hf={hf}", "task.name=countdown", f"train.steps={args.steps}",
               f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
               f"rollout.max_new_tokens={args.max_new_tokens}", f"algorithm.estimator={args.estimator}",
               "task.heldout=1", "eval.samples=1", "eval.max_new_tokens=4", "checkpoint.every=1000",
               "algorithm.log_router_mismatch=false", "logging.progress=false", *VARIANTS[name]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    timed = steps[1:] or steps  # the first step warms up allocators and caches
    phases = {p: sum(s[f"time_{p}"] for s in timed) / len(timed) for p in PHASES}
    return {"phases_s": phases, "step_s": sum(phases.values()),
            "response_length": sum(s["response_length"] for s in timed) / len(timed),
            "padding": sum(s["padding"] for s in timed) / len(timed), "steps_timed": len(timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--estimator", default="trajectory")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--port", type=int, default=29531)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", help="where the result goes (default benchmarks/results/rl_step-<device>.json)")
    args = p.parse_args()

    from dare_mega.checkpoint.tiny import make_tiny_checkpoint

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        hf = os.path.join(workdir, "model")
        make_tiny_checkpoint(hf, preset=model_config(), max_shard_bytes=1 << 30)
        for name in args.variants.split(","):
            results[name] = run_variant(name, hf, workdir, args)
            r = results[name]
            print(f"{name:15s} step {r['step_s']:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
                  + f"  response {r['response_length']:.1f}  padding {r['padding']:.2f}", flush=True)
    speedup = None
    if {"cached+packed", "nocache+padded"} <= results.keys():
        speedup = results["nocache+padded"]["step_s"] / results["cached+packed"]["step_s"]
        print(f"end-to-end speedup, cached+packed over nocache+padded: {speedup:.2f}x")
    from _results import device_name, write_result

    write_result("rl_step", {"device": device_name(args.threads), "model": {k: model_config()[k] for k in (
        "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "block_size")},
        "settings": vars(args), "variants": results, "speedup_end_to_end": speedup}, args.out)

if __name__ == "__main__":
    main()
