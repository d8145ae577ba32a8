"""Shared fixtures: tiny checkpoints made by the project, torchrun launcher, a world of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
def _shared() -> Path:
    """../shared beside the checkout (or $DARE_MEGA_SHARED): the published configs and tensor-name indexes."""
    if os.environ.get("DARE_MEGA_SHARED"):
        return Path(os.environ["DARE_MEGA_SHARED"])
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


SHARED = _shared()
REFERENCE_CONFIGS = SHARED / "reference" / "model_configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment for a child process: without the torch.distributed variables of this process (the
    in-process `world1` fixture sets them, and a child must not try to reuse its port)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def start_torchrun(nproc: int, script_or_module: list[str], env: dict | None = None) -> subprocess.Popen:
    """`torchrun` started in the background (output captured), for a run that can overlap another one: every
    process has one thread, so a lone single-process run leaves the second core idle. `completed` waits."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *script_or_module]
    return start(cmd, env)


def start(cmd: list[str], env: dict | None = None, cwd=REPO) -> subprocess.Popen:
    """A child process in the background with clean_env(**env), its output captured as text."""
    return subprocess.Popen(cmd, cwd=str(cwd), env=clean_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def completed(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a process from `start` / `start_torchrun` (killed past the timeout); its CompletedProcess."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def torchrun(nproc: int, script_or_module: list[str], timeout: int = 600, env: dict | None = None):
    """Run under torchrun with gloo on loopback, one thread per process; returns the CompletedProcess."""
    return completed(start_torchrun(nproc, script_or_module, env), timeout)


def run_json_worker(nproc: int, args: list[str], out: Path, timeout: int = 900):
    """Run a worker script that writes JSON to `out` (its last argument); returns the parsed JSON."""
    proc = torchrun(nproc, [*args, str(out)], timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def run_worker(nproc: int, cases: list[dict], tmp_path: Path, timeout: int = 900) -> list[dict]:
    """Run tests/workers/parity_worker.py on `cases` in one torchrun call; returns its results."""
    spec = tmp_path / f"cases-{nproc}.json"
    out = tmp_path / f"results-{nproc}.json"
    spec.write_text(json.dumps(cases))
    proc = torchrun(nproc, ["tests/workers/parity_worker.py", str(spec), str(out)], timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def saved_activation_bytes(model, fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `fn` runs its forward, less the
    parameters' (the matmuls save their weights too)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack_hook(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny checkpoints of each family, made once per session: {"sdar": path, "sdar_moe": ..., "llada2_moe": ...,
    "llada": ..., "dream": ..., "llada_moe": ...}."""
    from dare_mega.checkpoint.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {
        "sdar": make_tiny_checkpoint(str(root / "tiny-sdar"), preset="tiny-sdar", seed=0),
        "sdar_moe": make_tiny_checkpoint(str(root / "tiny-sdar-moe"), preset="tiny-sdar-moe", seed=0),
        "llada2_moe": make_tiny_checkpoint(str(root / "tiny-llada2-moe"), preset="tiny-llada2-moe", seed=0),
        "llada": make_tiny_checkpoint(str(root / "tiny-llada"), preset="tiny-llada", seed=0),
        "dream": make_tiny_checkpoint(str(root / "tiny-dream"), preset="tiny-dream", seed=0),
        "llada_moe": make_tiny_checkpoint(str(root / "tiny-llada-moe"), preset="tiny-llada-moe", seed=0),
    }


# the main-job examples, run as they are (no variables but RUN_DIR), and the extra arguments and variables their
# tests give them. The default example runs 30 of its 40 RL steps: it is the longest of the three (its steps cost
# about twice theirs), and the held-out accuracy has clearly risen by then (the step rewards too: the last ten
# steps' mean over the first's, which 20 or 25 steps would not show, as the prompts drawn at steps 11-25 are hard).
EXAMPLES = {"rl_sdar_moe": ([], {"RL_STEPS": "30"}),
            "rl_llada": (["logging.progress=false"], {"ALGO": "trajectory"}),
            "rl_dream": (["logging.progress=false"], {"ALGO": "d1"})}


@pytest.fixture(scope="session")
def examples(tmp_path_factory):
    """`bash examples/<name>.sh` for each of EXAMPLES: SFT warm-up then RL on a tiny preset, run once per
    session, all at once (each is one process with one thread: on 2 cores three of them take about as long as
    the longest alone). {name: (run_dir, stdout)}. The default example's SFT checkpoint
    (run_dir/sft/checkpoints/step_*) is the warm model of the RL and Ray tests, which need non-zero rewards and
    gradients."""
    started = {}
    for name, (arguments, variables) in EXAMPLES.items():
        run_dir = tmp_path_factory.mktemp(name)
        env = clean_env(RUN_DIR=str(run_dir), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", **variables)
        started[name] = (run_dir, subprocess.Popen(["bash", f"examples/{name}.sh", *arguments], cwd=REPO, env=env,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for name, (run_dir, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"examples/{name}.sh:\n" + stdout[-3000:] + stderr[-6000:]
        out[name] = (run_dir, stdout)
    return out


@pytest.fixture(scope="session")
def example_run(examples):
    """The default example (`bash examples/rl_sdar_moe.sh`): (run_dir, stdout)."""
    return examples["rl_sdar_moe"]


def warm_checkpoint(example) -> str:
    """The SFT checkpoint the default example trained before its RL."""
    run_dir, _ = example
    return str(sorted((run_dir / "sft" / "checkpoints").glob("step_*"))[-1])


@pytest.fixture(scope="session")
def world1():
    """torch.distributed and Megatron's groups for one process (TP=PP=EP=1), shared by in-process tests."""
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel

    env = init_distributed()
    init_model_parallel(ParallelLayout())
    return env


@pytest.fixture(scope="session")
def reference_configs():
    if not REFERENCE_CONFIGS.is_dir():
        raise AssertionError(
            f"{REFERENCE_CONFIGS} is missing: the published configs and tensor-name indexes live in ../shared "
            "(set DARE_MEGA_SHARED to its location)"
        )
    return REFERENCE_CONFIGS
