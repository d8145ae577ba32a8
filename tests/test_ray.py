"""Ray orchestration on a local cluster: colocated and disaggregated layouts run two RL steps of the tiny model,
with the native engine standing in for SGLang, and match the same steps under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, clean_env, completed, start_torchrun, warm_checkpoint

COMMON = ["task.heldout=4", "eval.samples=1", "train.steps=2", "rollout.prompts_per_step=4", "rollout.n=4",
          "checkpoint.every=1000", "logging.progress=false", "optim.lr=0.05"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_ray_layouts_run_rl_steps_like_torchrun(example_run, tmp_path):
    # the default example's SFT-warmed model, so that RL steps see non-zero rewards and gradients
    overrides = [f"model.init={warm_checkpoint(example_run)}", *COMMON]
    # the torchrun baseline alongside the first Ray run (whose cluster start-up leaves the cores idle a while)
    started = start_torchrun(2, ["-m", "dare_mega.trainer.rl", "--config", "configs/recipes/rl_tiny_sdar_moe.yaml",
                                 f"run_dir={tmp_path / 'torchrun'}", *overrides])
    baseline = None
    for placement in ("colocated", "disaggregated"):
        run_dir = tmp_path / placement
        command = [sys.executable, "-m", "dare_mega.cluster.ray_launch", "--config",
                   "configs/recipes/rl_tiny_sdar_moe.yaml", "--trainers", "2", "--placement", placement,
                   "--engines", "1", "--num-cpus", "4", f"run_dir={run_dir}", *overrides]
        done = subprocess.run(command, cwd=REPO, env=clean_env(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        assert f"ray_launch: {placement}, 2 trainer rank(s)" in done.stdout
        engine = "RemoteEngine" if placement == "disaggregated" else "NativeEngine"
        assert f"rollouts on {engine}" in done.stdout + done.stderr
        if baseline is None:
            proc = completed(started)
            assert proc.returncode == 0, proc.stderr[-4000:]
            baseline = records(tmp_path / "torchrun")
            assert any(r["reward_std"] > 0 for r in baseline) and any(r["grad_norm"] > 0 for r in baseline)
        steps = records(run_dir)
        assert [r["weight_version"] for r in steps] == [1, 2]
        for ours, theirs in zip(steps, baseline):  # the same step, wherever the ranks and engines are placed
            assert ours["reward_mean"] == theirs["reward_mean"] and ours["response_length"] == theirs["response_length"]
            assert abs(ours["loss"] - theirs["loss"]) <= 1e-6 and abs(ours["grad_norm"] - theirs["grad_norm"]) <= 1e-5
