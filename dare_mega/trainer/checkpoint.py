"""Training checkpoints: model, optimizer, LR schedule, data position and RNG states, all or nothing.

RUN_DIR/checkpoints/step_00000020/ is a torch_dist checkpoint (megatron.core.dist_checkpointing) of
{model, optimizer (distributed, dp_reshardable), scheduler, data loader position, per-rank RNG states, step}
plus dare_mega.json and hf_assets/ (so `tools/convert_checkpoint.py --direction mcore2hf` exports it to HF).
It is written into `.step_00000020.partial` and renamed when every rank has finished; `latest()` considers
only renamed directories that hold every file, so a checkpoint cut off mid-write is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from dare_mega.checkpoint.torch_dist import ASSETS_DIR, META_FILE, model_sharded_state_dict
from dare_mega.errors import CheckpointError

TRAIN_STATE = "train_state.json"
_NAME = re.compile(r"^step_(\d{8})$")
REQUIRED = (".metadata", "metadata.json", "common.pt", META_FILE, TRAIN_STATE)
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def name_of(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for entry in os.listdir(directory):
        match = _NAME.match(entry)
        path = os.path.join(directory, entry)
        if match and all(os.path.exists(os.path.join(path, f)) for f in REQUIRED):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(directory: str) -> str | None:
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dict(chunks, optimizer, scheduler, step: int, data_state: dict, loading: bool):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=OPTIMIZER_SHARDING)
    rank, world = dist.get_rank(), dist.get_world_size()
    state["rng"] = ShardedObject("rng_state", None if loading else _rng_state(), (world,), (rank,), replica_id=0)
    state["scheduler"] = scheduler.state_dict()
    state["data"] = dict(data_state)
    state["step"] = step
    return state


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """torch's Adam keeps its step count per parameter; Megatron's dp_reshardable load restores it from the
    placeholder state instead of the checkpoint (Apex's FusedAdam, which it expects on GPUs, keeps the step in
    the param groups). Set every parameter's step from the checkpoint's param groups."""
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    dicts = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    for inner, state in zip(inners, dicts):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in inner.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step, dtype=param_state["step"].dtype)


def save(directory: str, step: int, chunks, optimizer, scheduler, data_state: dict, meta: dict,
         assets_dir: str, train_state: dict, keep: int) -> str:
    """Write checkpoint `step` (every rank calls it); keeps the newest `keep` complete ones."""
    from megatron.core import dist_checkpointing

    final = os.path.join(directory, name_of(step))
    tmp = os.path.join(directory, f".{name_of(step)}.partial")
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(_state_dict(chunks, optimizer, scheduler, step, data_state, loading=False), tmp)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        shutil.copytree(assets_dir, os.path.join(tmp, ASSETS_DIR))
        with open(os.path.join(tmp, TRAIN_STATE), "w") as f:  # written last: the checkpoint is complete
            json.dump({"step": step, **train_state}, f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: str, chunks, optimizer, scheduler) -> tuple[int, dict]:
    """Restore everything from a complete checkpoint; returns (step, data loader state)."""
    from megatron.core import dist_checkpointing

    from dare_mega.models.hf_loader import unwrap

    missing = [f for f in REQUIRED if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"{path}: not a complete training checkpoint (missing {', '.join(missing)})")
    # a fresh optimizer has no state to describe: give it placeholder state (one zero-gradient step) that
    # the load then overwrites, as Megatron's own loader does; the model weights are loaded after it
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()
    template = _state_dict(chunks, optimizer, scheduler, 0, {}, loading=True)
    loaded = dist_checkpointing.load(template, path)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
    with torch.no_grad():  # float32 runs: the optimizer's main params are views of the model's
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if loaded.get("rng") is not None:
        _set_rng_state(loaded["rng"])
    return int(loaded["step"]), loaded["data"]
