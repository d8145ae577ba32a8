"""SFT of diffusion LLMs on Megatron-Core: `python -m dare_mega.trainer.sft --config FILE [section.key=value ...]`

Run under torchrun (one process is a world of one). The whole run:

  config (validated, before any process group) -> model args + layout checks -> process groups
  -> data (read, tokenize, pack, deal; bad records named) -> model (HF weights into shards) + distributed optimizer
  + LR schedule
  -> resume from the newest complete checkpoint -> for each step: noise the packed rows (the objective),
     forward/backward through Megatron's pipeline schedule, clip, step, log -> checkpoints every N steps.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from dare_mega.config import load_config, to_dict
from dare_mega.errors import ConfigError, exit_status
from dare_mega.trainer.config import SFTConfig
from dare_mega.trainer.setup import (
    build_optimizer,
    check_plan,
    checkpoint_dir,
    ensure_model_dir,
    parse_args,
    preflight,
    recompute,
    resume,
    training_meta,
)


def check_budget(cfg: SFTConfig, args, layout) -> None:
    """data.token_budget against the block size and sequence parallelism."""
    block = args.diffusion.block_size
    if cfg.data.token_budget % block:
        raise ConfigError(f"data.token_budget={cfg.data.token_budget} is not a multiple of the block size {block}")
    if layout.sp and (2 * cfg.data.token_budget) % layout.tp:
        raise ConfigError(f"data.token_budget={cfg.data.token_budget}: twice it must divide by parallel.tp={layout.tp}")


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
    rows, dropped = pack(samples, cfg.data.token_budget, cfg.data.overlong, cfg.data.packing)
    loader = PackedLoader(rows, dp_size, dp_rank, cfg.train.micro_batches, cfg.train.seed, cfg.data.shuffle)
    return loader, {"records": len(records), "rows": len(rows), "dropped_overlong": dropped,
                    "tokens": sum(len(s.ids) for s in samples)}


def run(cfg: SFTConfig) -> dict:
    from megatron.core import parallel_state as ps

    from dare_mega.algorithms.sft import objective, sft_batch
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions, params_dtype
    from dare_mega.parallel import destroy_distributed, init_distributed, init_model_parallel
    from dare_mega.trainer import checkpoint as ckpt
    from dare_mega.trainer.metrics import Metrics

    hf_dir = ensure_model_dir(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args, layout = preflight(cfg, hf_dir, world)
    check_budget(cfg, args, layout)
    check_plan(cfg, args, world, rl=False)
    env = init_distributed()
    init_model_parallel(layout, seed=cfg.train.seed)
    # the data is read, tokenized, packed and dealt (a bad record named) before any model or optimizer exists
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    loader, data_stats = build_data(cfg, args, hf_dir, dp, dp_rank)
    dtype = params_dtype(cfg.model.dtype, env.device)
    chunks, args = build_from_hf(hf_dir, layout, RuntimeOptions(params_dtype=dtype, moe_experts=cfg.model.experts,
                                                                recompute_granularity=recompute(cfg.train)),
                                 mask_token_id=cfg.model.mask_token_id, block_size=cfg.model.block_size)
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(cfg, chunks, dtype)
    runner = Runner(chunks, args)
    obj = objective(cfg.loss.name, args.family, cfg.loss.eps, cfg.loss.t_min, cfg.loss.t_max, cfg.loss.normalize)

    ckpt_dir = checkpoint_dir(cfg)
    start_step, data_state = resume(cfg, chunks, optimizer, scheduler)
    if data_state is not None:
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
        tokens = torch.tensor([sum(r.tokens for r in rows)], dtype=torch.float64, device=device)
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


def main(argv=None) -> int:
    path, overrides = parse_args("python -m dare_mega.trainer.sft", __doc__, argv)
    return exit_status(lambda: run(load_config(SFTConfig, path, overrides)))


if __name__ == "__main__":
    sys.exit(main())
