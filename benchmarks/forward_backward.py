#!/usr/bin/env python
"""Forward/backward of one preset at TP=1 (random weights) on the SDAR training layout; writes a JSON result.

    python benchmarks/forward_backward.py --preset sdar-1.7b-chat --seq-len 4096 --dtype bf16   # a GPU
    python benchmarks/forward_backward.py --preset tiny-sdar --seq-len 256                      # a CPU
    python benchmarks/forward_backward.py --preset sdar-30b-a3b-chat --layers 4 --experts sequential

Model FLOPs utilisation: 6 x active parameters (the routed experts counted at top-k / experts; the input
embedding, a lookup, not counted) x tokens per second, over the device's dense bf16 peak (H100 / H200 SXM:
989 TFLOP/s; --peak-tflops for others).

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

EXPERT_MODULES = ("GroupedExperts", "SequentialMLP", "TEGroupedMLP", "GroupedMLP")
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def active_parameters(model, model_args) -> int:
    """Parameters a token passes through: routed experts at top-k / experts, the input embedding left out."""
    moe = model_args.moe
    total = 0
    for name, param in model.named_parameters():
        if name.startswith("embedding.") and not model_args.tie_word_embeddings:
            continue
        share = moe.topk / moe.num_experts if moe and ".local_experts." in name else 1.0
        total += param.numel() * share
    return int(total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sdar")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per stream (the batch holds 2x)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto")
    p.add_argument("--experts", choices=("auto", "grouped", "sequential"), default="auto",
                   help="MoE experts: grouped GEMMs (models/experts.py) or Megatron's SequentialMLP")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: known GPUs)")
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
    preset = load_preset(args.preset)
    if args.layers:
        preset = {**preset, "num_hidden_layers": args.layers}
        if isinstance(preset.get("moe_layer_freq"), list):
            preset["moe_layer_freq"] = preset["moe_layer_freq"][: args.layers]
    model_args = args_from_config(preset, args.preset)
    options = RuntimeOptions(params_dtype=dtype, attention_backend=args.attention, moe_experts=args.experts)
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
    active = active_parameters(model, model_args)
    tokens_per_second = 2 * n * b / seconds
    peak_tf = args.peak_tflops or peak_tflops(torch.cuda.get_device_name() if on_gpu else "")
    mfu = 6 * active * tokens_per_second / (peak_tf * 1e12) if peak_tf else None
    experts = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in EXPERT_MODULES})
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
        "tokens_per_second": tokens_per_second,
        "layers": model_args.num_layers,
        "experts": experts,
        "active_parameters": active,
        "model_flops_utilization": mfu,
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
