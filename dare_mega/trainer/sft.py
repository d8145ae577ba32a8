"""SFT of diffusion LLMs on Megatron-Core: `python -m dare_mega.trainer.sft --config FILE [section.key=value ...]`

Run under torchrun (one process is a world of one). The whole run:

  config (validated, before any process group) -> model args + layout checks -> process groups
  -> data (read, tokenize, pack, deal; bad records named) -> model (HF weights into shards) + distributed optimizer
  + LR schedule
  -> resume from the newest complete checkpoint -> for each step: noise the packed rows (the objective),
     forward/backward through Megatron's pipeline schedule, clip, step, log -> checkpoints every N steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from dare_mega.config import load_config, to_dict
from dare_mega.errors import ConfigError, exit_status
from dare_mega.trainer.config import SFTConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dare_mega.trainer.sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML recipe (configs/recipes/); defaults otherwise")
    p.add_argument("--resume", help="shortcut for checkpoint.resume=...")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def ensure_model_dir(cfg) -> str:
    """The HF checkpoint to train: model.hf, or a tiny one made (once, race-free) from model.preset."""
    if cfg.model.hf:
        return cfg.model.hf
    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint

    return cached_tiny_checkpoint(cfg.model.preset)


def preflight(cfg, hf_dir: str, world_size: int, check_budget: bool = True):
    """Everything that can be checked without process groups: the model, the layout, the world size."""
    from dare_mega.models.builder import load_model_args
    from dare_mega.models.transformer_config import check_layout
    from dare_mega.parallel.layout import ParallelLayout

    args = load_model_args(hf_dir, mask_token_id=cfg.model.mask_token_id, block_size=cfg.model.block_size)
    p = cfg.parallel
    layout = ParallelLayout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp, moe_dispatcher=p.moe_dispatcher)
    check_layout(args, layout, f"{hf_dir}/config.json (parallel.*)")
    layout.check_world(world_size)
    block = args.diffusion.block_size
    if not check_budget:
        return args, layout
    if cfg.data.token_budget % block:
        raise ConfigError(f"data.token_budget={cfg.data.token_budget} is not a multiple of the block size {block}")
    if layout.sp and (2 * cfg.data.token_budget) % layout.tp:
        raise ConfigError(f"data.token_budget={cfg.data.token_budget}: twice it must divide by parallel.tp={layout.tp}")
    return args, layout


def build_data(cfg: SFTConfig, args, hf_dir: str, dp_size: int, dp_rank: int):
    from dare_mega.data.records import read_records, synthetic_records
    from dare_mega.data.sft import PackedLoader, pack, tokenize_record
    from dare_mega.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    if tokenizer is None:
        raise ConfigError(f"{hf_dir}: SFT needs the checkpoint's tokenizer files (for its chat template)")
    if cfg.data.train:
        records = read_records(cfg.data.train)
    elif cfg.data.task:
        from dare_mega.data.tasks import make_task

        records = make_task(cfg.data.task, cfg.data.synthetic_samples, seed=0)  # the RL task's training prompts
    else:
        records = synthetic_records(cfg.data.synthetic_samples, cfg.train.seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else args.diffusion.eos_token_ids[0]
    samples = [tokenize_record(r, tokenizer, cfg.data, args.diffusion.block_size, args.diffusion.pad_token_id, eos)
               for r in records]
    rows, dropped = pack(samples, cfg.data.token_budget, cfg.data.overlong)
    loader = PackedLoader(rows, dp_size, dp_rank, cfg.train.micro_batches, cfg.train.seed, cfg.data.shuffle)
    return loader, {"records": len(records), "rows": len(rows), "dropped_overlong": dropped,
                    "tokens": sum(len(s.ids) for s in samples)}


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


def run(cfg: SFTConfig) -> dict:
    from megatron.core import parallel_state as ps

    from dare_mega.algorithms.sft import objective, sft_batch
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import destroy_distributed, init_distributed, init_model_parallel
    from dare_mega.trainer import checkpoint as ckpt
    from dare_mega.trainer.metrics import Metrics

    hf_dir = ensure_model_dir(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args, layout = preflight(cfg, hf_dir, world)
    env = init_distributed()
    init_model_parallel(layout, seed=cfg.train.seed)
    # the data is read, tokenized, packed and dealt (a bad record named) before any model or optimizer exists
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    loader, data_stats = build_data(cfg, args, hf_dir, dp, dp_rank)
    on_gpu = env.device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.model.dtype]
    chunks, args = build_from_hf(hf_dir, layout, RuntimeOptions(params_dtype=dtype),
                                 mask_token_id=cfg.model.mask_token_id, block_size=cfg.model.block_size)
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(cfg, chunks, dtype)
    runner = Runner(chunks, args)
    obj = objective(cfg.loss.name, args.family, cfg.loss.eps, cfg.loss.t_min, cfg.loss.t_max)

    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")
    start_step = 0
    resume = cfg.checkpoint.resume
    path = ckpt.latest(ckpt_dir) if resume == "auto" else (None if resume == "none" else resume)
    if path:
        start_step, data_state = ckpt.load(path, chunks, optimizer, scheduler)
        loader.load_state_dict(data_state)
    meta, assets = training_meta(hf_dir, args, layout, dtype, cfg.run_dir, env)
    metrics = Metrics(cfg.run_dir, cfg.logging, cfg.train.steps, start_step, env.is_main, to_dict(cfg))
    if env.is_main:
        print(f"sft: {args.architecture} at {layout.describe()} on {env.world_size} process(es), objective {obj.name}; "
              f"data: {data_stats}; starting at step {start_step}", flush=True)
    device = env.device
    last = None
    for step in range(start_step + 1, cfg.train.steps + 1):
        started = time.perf_counter()
        rows, slots = loader.next_step()
        # one generator per row of the global batch: the noise is the same whatever the layout
        generators = [torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 10_007 + slot)
                      for slot in slots]
        batch = sft_batch(rows, obj, args.diffusion.mask_token_id, args.diffusion.block_size, generators)
        optimizer.zero_grad()
        lr = optimizer.param_groups[0]["lr"]
        loss = runner.loss_and_grads(batch, micro_batch_size=1)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(1)
        tokens = torch.tensor([sum(d[1] for r in rows for d in r.documents)], dtype=torch.float64, device=device)
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        seconds = time.perf_counter() - started
        last = {"step": step, "loss": loss, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": int(tokens.item()), "tokens_per_s": tokens.item() / seconds, "seconds": seconds,
                "skipped": not ok}
        metrics.log(last)
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
            ckpt.save(ckpt_dir, step, chunks, optimizer, scheduler, loader.state_dict(), meta, assets,
                      {"config": to_dict(cfg), "data": data_stats}, cfg.checkpoint.keep)
        if cfg.train.stop_after is not None and step >= cfg.train.stop_after:
            break
    metrics.close()
    if env.is_main and last:
        print(f"sft done: step {last['step']}, loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s; "
              f"run dir {cfg.run_dir}", flush=True)
    destroy_distributed()
    return last or {}


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


def main(argv=None) -> int:
    options = parse_args(argv)
    overrides = list(options.overrides) + ([f"checkpoint.resume={options.resume}"] if options.resume else [])
    return exit_status(lambda: run(load_config(SFTConfig, options.config, overrides)))


if __name__ == "__main__":
    sys.exit(main())
