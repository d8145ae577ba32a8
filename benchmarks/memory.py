#!/usr/bin/env python
"""The memory plan's prediction against the GPU's allocator, per phase, and the cost of train.offload; JSON.

    python benchmarks/memory.py [--preset sdar-1.7b-chat] [--layers N] [--tokens 4096] [--new-tokens 256]
                                [--rows 8] [--recompute none]

One process (TP=1), random weights in bf16, the preset's shape with `--layers` layers. Phases, each measured with
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` and compared with trainer/memory_plan.py's
peak for the same config (SFT micro-batch of `--tokens` per stream; a Megatron-backend rollout of `--rows`
prompts of 64 tokens with the block KV cache):

  static    parameters + gradients + optimizer state after the first step (memory_allocated)
  train     one more forward-backward and optimizer step
  offload   what stays allocated with the optimizer state and gradients in host memory
  rollout   a cached rollout on the trainer's shards, with the trainer's state offloaded
  and the offload + reload seconds per step.

On a CPU (no allocator statistics) it runs the tiny preset for the plumbing and reports the seconds only.
Result: benchmarks/results/memory-<device>.json; docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _results import device_name, write_result


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default=None, help="default: sdar-1.7b-chat on a GPU, tiny-sdar-moe on a CPU")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per stream of the training micro-batch")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from dare_mega.algorithms.sft import objective, sft_batch
    from dare_mega.config import load_config
    from dare_mega.data.sft import Sample, pack
    from dare_mega.models.builder import args_from_config, build_model
    from dare_mega.models.presets import load_preset
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed, init_model_parallel
    from dare_mega.rollout.megatron_engine import MegatronEngine
    from dare_mega.rollout.types import SamplingParams
    from dare_mega.trainer.config import RLConfig, SFTConfig
    from dare_mega.trainer.memory_plan import plan
    from dare_mega.trainer.offload import TrainerOffload
    from dare_mega.trainer.setup import build_optimizer

    env = init_distributed()
    gpu = env.device.type == "cuda"
    preset = a.preset or ("sdar-1.7b-chat" if gpu else "tiny-sdar-moe")
    tokens = a.tokens or (4096 if gpu else 64)
    new_tokens = a.new_tokens or (256 if gpu else 8)
    dtype = torch.bfloat16 if gpu else torch.float32
    config = load_preset(preset)
    if a.layers:
        config["num_hidden_layers"] = a.layers
        if "mlp_only_layers" in config:
            config["mlp_only_layers"] = [i for i in config["mlp_only_layers"] if i < a.layers]
    args = args_from_config(config, preset)
    layout = ParallelLayout()
    init_model_parallel(layout)
    chunks = build_model(args, layout, RuntimeOptions(params_dtype=dtype,
                                                      recompute_granularity=None if a.recompute == "none"
                                                      else a.recompute))
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    sft = SFTConfig()
    sft.data.token_budget, sft.train.micro_batches, sft.train.recompute = tokens, 1, a.recompute
    sft.model.dtype = "bfloat16" if gpu else "float32"
    optimizer, _ = build_optimizer(sft, chunks, dtype)
    runner = Runner(chunks, args)
    block = args.diffusion.block_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(args.vocab_size, 150_000) - 10, (tokens,), generator=g).tolist()
    rows, _ = pack([Sample(ids, prompt_len=tokens // 8)], budget=tokens)
    obj = objective("sdar_block", args.family)
    memory = (lambda: torch.cuda.memory_allocated()) if gpu else (lambda: 0)

    def peak_of(fn):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fn()
        if gpu:
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() if gpu else 0

    def step():
        optimizer.zero_grad()
        batch = sft_batch(rows, obj, args.diffusion.mask_token_id, block, [torch.Generator().manual_seed(1)])
        runner.loss_and_grads(batch.to(env.device) if hasattr(batch, "to") else batch, micro_batch_size=1)
        optimizer.step()

    step()
    measured = {"static": memory()}
    measured["train"] = peak_of(step)
    keeper = TrainerOffload(chunks, optimizer)
    started = time.perf_counter()
    keeper.offload()
    offload_s = time.perf_counter() - started
    measured["offload"] = memory()
    prompts = [torch.randint(10, 200, (64,), generator=g).tolist() for _ in range(a.rows)]
    params = SamplingParams(max_new_tokens=new_tokens, policy="low_confidence_static", steps=block,
                            temperature=1.0, seeds=tuple(range(a.rows)), stop_token_ids=())
    engine = MegatronEngine(runner)
    measured["rollout"] = peak_of(lambda: engine.generate(prompts, params, cache=True))
    started = time.perf_counter()
    keeper.reload()
    reload_s = time.perf_counter() - started

    rl = load_config(RLConfig, None, [f"rollout.prompts_per_step={a.rows}", "rollout.n=1", f"task.heldout={a.rows}",
                                      "eval.samples=1", f"rollout.max_new_tokens={new_tokens}",
                                      "rollout.backend=megatron", "train.offload=true", "plan.prompt_tokens=64",
                                      f"train.pack_tokens={tokens}", f"train.recompute={a.recompute}"])
    huge = 2**50
    sft_plan = plan(sft, args, 1, huge, rl=False, dtype=dtype, attention="flex" if gpu else "sdpa")
    rl_plan = plan(rl, args, 1, huge, rl=True, dtype=dtype, attention="flex" if gpu else "sdpa")
    static = sum(sft_plan.parts[k] for k in ("parameters", "gradients", "optimizer_state"))
    predicted = {"static": static, "train": sft_plan.peak("train"), "offload": sft_plan.parts["parameters"],
                 "rollout": rl_plan.peak("rollout")}
    result = {
        "benchmark": "memory", "device": device_name(torch.get_num_threads()), "preset": preset,
        "layers": args.num_layers, "dtype": str(dtype).removeprefix("torch."), "tokens_per_stream": tokens,
        "recompute": a.recompute, "rollout_rows": a.rows, "new_tokens": new_tokens,
        "measured_bytes": measured if gpu else None, "predicted_bytes": predicted,
        "ratio": {k: predicted[k] / measured[k] for k in measured if measured[k]} if gpu else None,
        "offload_seconds": offload_s, "reload_seconds": reload_s,
    }
    print({k: result[k] for k in ("preset", "ratio", "offload_seconds", "reload_seconds")}, flush=True)
    write_result("memory", result, a.out)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
