"""What the SFT and RL trainers share: the model directory, the checks before any process group, the parameter
dtype, the optimizer and schedule, where checkpoints live and which one to resume, what checkpoints record."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def parse_args(prog: str, description: str, argv=None):
    """`--config FILE [--resume PATH] [section.key=value ...]` -> (config path, overrides)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML recipe (configs/recipes/); defaults otherwise")
    p.add_argument("--resume", help="shortcut for checkpoint.resume=...")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    options = p.parse_args(argv)
    return options.config, list(options.overrides) + ([f"checkpoint.resume={options.resume}"] if options.resume else [])


def ensure_model_dir(cfg) -> str:
    """The HF checkpoint to train: model.hf, or a tiny one made (once, race-free) from model.preset."""
    if cfg.model.hf:
        return cfg.model.hf
    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint

    return cached_tiny_checkpoint(cfg.model.preset)


def preflight(cfg, hf_dir: str, world_size: int):
    """Everything that can be checked without process groups: the model, the layout, the world size."""
    from dare_mega.models.builder import load_model_args
    from dare_mega.models.transformer_config import check_layout
    from dare_mega.parallel.layout import ParallelLayout

    args = load_model_args(hf_dir, mask_token_id=cfg.model.mask_token_id, block_size=cfg.model.block_size)
    p = cfg.parallel
    layout = ParallelLayout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp, moe_dispatcher=p.moe_dispatcher)
    check_layout(args, layout, f"{hf_dir}/config.json (parallel.*)")
    layout.check_world(world_size)
    return args, layout


def recompute(train) -> str | None:
    """train.recompute as Megatron's recompute_granularity (None: keep every activation)."""
    return None if train.recompute == "none" else train.recompute


def check_plan(cfg, args, world: int, rl: bool, prompt_tokens: int | None = None) -> dict:
    """The memory plan (trainer/memory_plan.py) for this launch, before any process group or model: a layout
    that overflows a GPU is refused with the phase, its parts and the numbers, unless plan.override (then the
    warning is printed and recorded in RUN_DIR/plan.json)."""
    import sys

    from dare_mega.diffusion.attention import resolve_backend
    from dare_mega.errors import ConfigError
    from dare_mega.models.transformer_config import params_dtype
    from dare_mega.rollout.memory import GIB, host_bytes
    from dare_mega.trainer.memory_plan import plan

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if cfg.plan.gpu_memory_gib is not None:
        memory = int(cfg.plan.gpu_memory_gib * GIB)
    elif device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = host_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    result = plan(cfg, args, world, memory, rl, dtype=params_dtype(cfg.model.dtype, device),
                  attention=resolve_backend("auto"), prompt_tokens=prompt_tokens)
    record = {**result.to_dict(), "override": bool(cfg.plan.override and not result.fits)}
    main = int(os.environ.get("RANK", "0")) == 0
    if not result.fits and not cfg.plan.override:
        raise ConfigError(f"memory plan ({result.world} GPUs): {result.verdict()}. Change the layout, "
                          "train.offload / train.recompute / the batch, or set plan.override=true to start anyway "
                          "(python -m dare_mega.plan prints every part)")
    if main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "plan.json.tmp"), "w") as f:
            json.dump(record, f, indent=2)
        os.replace(os.path.join(cfg.run_dir, "plan.json.tmp"), os.path.join(cfg.run_dir, "plan.json"))
        if record["override"]:
            print(f"WARNING plan.override=true: starting although the memory plan says {result.verdict()}",
                  file=sys.stderr, flush=True)
        else:
            print(f"memory plan: {result.verdict()}", file=sys.stderr, flush=True)
    return record


def build_optimizer(cfg, chunks, params_dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, use_distributed_optimizer=True,
            bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        ),
        chunks,
    )
    decay_steps = max(cfg.train.steps - o.warmup_steps, 1) + o.warmup_steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=o.decay,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


def pending_optimizer_state_bytes(optimizer) -> int:
    """The Adam moments (two per parameter of this rank's main-parameter shard) that the first step will
    allocate: what an engine built beside the trainer must leave free."""
    total = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if p not in inner.state or not inner.state[p]:
                    total += 2 * p.numel() * p.element_size()
    return total


def checkpoint_dir(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")


def resume(cfg, chunks, optimizer, scheduler) -> tuple[int, dict | None]:
    """checkpoint.resume: auto (the newest complete checkpoint, if any), none, or a path. Loads it into the
    model, optimizer and scheduler; returns (the step it holds, its data state), or (0, None) for a fresh start."""
    from dare_mega.trainer import checkpoint as ckpt

    path = cfg.checkpoint.resume
    if path == "auto":
        path = ckpt.latest(checkpoint_dir(cfg))
    if path is None or path == "none":
        return 0, None
    return ckpt.load(path, chunks, optimizer, scheduler)


def training_meta(hf_dir: str, args, layout, dtype, run_dir: str, env):
    """What training checkpoints record about the source HF checkpoint (so that they export to HF), and
    the directory of its config and tokenizer files copied into the run."""
    from dare_mega.checkpoint.torch_dist import FORMAT_VERSION, dtype_name
    from dare_mega.models.transformer_config import padded_vocab_size
    from dare_mega.storage.safetensors_io import CheckpointReader

    source = CheckpointReader(hf_dir)
    meta = {
        "format": FORMAT_VERSION, "architecture": args.architecture,
        "hf_config": json.load(open(os.path.join(hf_dir, "config.json"))),
        "hf_tensors": {n: {"dtype": dtype_name(source.dtype(n)), "shape": list(source.shapes[n])} for n in source.names()},
        "hf_tensor_order": source.names(), "padded_vocab_size": padded_vocab_size(args.vocab_size, layout.tp),
        "params_dtype": dtype_name(dtype), "saved_layout": layout.describe(),
    }
    return meta, _assets_dir(hf_dir, run_dir, env)


def _assets_dir(hf_dir: str, run_dir: str, env) -> str:
    """The source checkpoint's config and tokenizer files, copied once into the run directory."""
    from dare_mega.checkpoint.torch_dist import source_assets

    target = os.path.join(run_dir, "hf_assets")
    if env.is_main and not os.path.isdir(target):
        os.makedirs(target + ".tmp", exist_ok=True)
        for name in source_assets(hf_dir):
            with open(os.path.join(hf_dir, name), "rb") as src, open(os.path.join(target + ".tmp", name), "wb") as dst:
                dst.write(src.read())
        os.replace(target + ".tmp", target)
    dist.barrier()
    return target


