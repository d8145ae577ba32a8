#!/usr/bin/env python
"""Forward/backward of one preset at TP=1 (random weights) on the SDAR training layout; writes a JSON result.

    python benchmarks/forward_backward.py --preset sdar-1.7b-chat --seq-len 4096 --dtype bf16   # a GPU
    python benchmarks/forward_backward.py --preset tiny-sdar --seq-len 256                      # a CPU

Measures seconds per step (forward + backward of a two-stream [x_t ; x_0] batch with the block-diffusion
mask), tokens per second, and peak memory (CUDA max allocated on GPUs, process peak RSS on CPUs). The result
goes to benchmarks/results/<preset>-<device>-<attention>.json; docs/benchmarks.md keeps the latest table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sdar")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per stream (the batch holds 2x)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from dare_mega.diffusion.masks import packed_position_ids, two_stream_inputs, two_stream_mask
    from dare_mega.models.builder import args_from_config, build_model
    from dare_mega.models.presets import load_preset
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed, init_model_parallel

    env = init_distributed()
    on_gpu = env.device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if on_gpu else "fp32")]
    layout = ParallelLayout()
    init_model_parallel(layout)
    model_args = args_from_config(load_preset(args.preset), args.preset)
    options = RuntimeOptions(params_dtype=dtype, attention_backend=args.attention)
    model = build_model(model_args, layout, options)[0]
    model.train()

    n, b = args.seq_len, args.batch_size
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, min(model_args.vocab_size, 150000), (b, n), generator=g)
    masked = torch.rand(b, n, generator=g) < 0.5
    noisy = torch.where(masked, torch.full_like(clean, model_args.diffusion.mask_token_id), clean)
    positions = packed_position_ids([[n // 2, n - n // 2]] * b, n)
    ids, pos = two_stream_inputs(noisy, clean, positions)
    mask = two_stream_mask(positions, model_args.diffusion.block_size).to(env.device)
    ids, pos = ids.to(env.device), pos.to(env.device)

    def step():
        out = model(ids, pos, mask)
        out[:, :n].float().logsumexp(-1).mean().backward()

    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    attention = model.decoder.layers[0].self_attention.core_attention.backend
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {
        "benchmark": "forward_backward",
        "preset": args.preset,
        "device": device,
        "attention": attention,
        "dtype": str(dtype).replace("torch.", ""),
        "tokens_per_stream": n,
        "batch_size": b,
        "seconds_per_step": seconds,
        "tokens_per_second": 2 * n * b / seconds,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda_max_allocated" if on_gpu else "process_peak_rss",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"{args.preset}-{'gpu' if on_gpu else 'cpu'}-{attention}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
