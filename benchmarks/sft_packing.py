#!/usr/bin/env python
"""SFT throughput, packed vs padded: training tokens per second and peak memory on mixed-length data.

    python benchmarks/sft_packing.py [--samples 64] [--min-len 16] [--max-len 256] [--budget 512]

The same samples (lengths log-uniform, or uniform, between --min-len and --max-len) go through forward and backward of the SDAR block-diffusion objective on
the two-stream layout (Megatron, TP=1): once packed under a token budget (several samples per row, kept
apart by the mask), once padded (one sample per row, padded to the longest). Tokens/s counts real tokens
only. Each variant runs in its own process so that peak memory is its own. Result:
benchmarks/results/sft_packing-<device>.json; docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config() -> dict:
    from _models import small_sdar_moe

    return small_sdar_moe(vocab_size=512)


def variant(name: str, args) -> dict:
    import torch

    from dare_mega.algorithms.sft import objective, sft_batch
    from dare_mega.checkpoint.tiny import make_tiny_checkpoint
    from dare_mega.data.sft import Sample, pack
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(ParallelLayout())
    hf = os.path.join(args.workdir, "model")
    if not os.path.exists(os.path.join(hf, "config.json")):
        make_tiny_checkpoint(hf, preset=model_config(), max_shard_bytes=1 << 30)
    chunks, model_args = build_from_hf(hf, ParallelLayout())
    runner = Runner(wrap_for_training(chunks), model_args)
    block = model_args.diffusion.block_size
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(args.samples):
        if args.lengths == "uniform":
            n = int(torch.randint(args.min_len // block, args.max_len // block + 1, (1,), generator=g)) * block
        else:  # log-uniform: many short samples, a few long ones, as SFT data usually is
            low, high = torch.log(torch.tensor(float(args.min_len))), torch.log(torch.tensor(float(args.max_len)))
            n = int(torch.exp(low + (high - low) * torch.rand((), generator=g))) // block * block or block
        ids = torch.randint(10, 250, (n,), generator=g).tolist()
        samples.append(Sample(ids, prompt_len=n // 4))
    if name == "packed":
        rows, _ = pack(samples, args.budget)
    else:  # one sample per row, padded to the longest
        longest = max(len(s.ids) for s in samples)
        rows = [pack([s], longest)[0][0] for s in samples]
    obj = objective("sdar_block", model_args.family)
    real = sum(len(s.ids) for s in samples)
    padded_tokens = sum(len(r.ids) for r in rows)

    def epoch():
        for i, row in enumerate(rows):
            batch = sft_batch([row], obj, model_args.diffusion.mask_token_id, block, [torch.Generator().manual_seed(i)])
            runner.loss_and_grads(batch, micro_batch_size=1)

    epoch()  # warm up
    start = time.perf_counter()
    epoch()
    seconds = time.perf_counter() - start
    return {
        "variant": name, "rows": len(rows), "real_tokens": real, "row_tokens": padded_tokens,
        "seconds": seconds, "tokens_per_s": real / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--lengths", choices=("log-uniform", "uniform"), default="log-uniform")
    p.add_argument("--workdir", default="/tmp/dare_mega_bench_sft")
    p.add_argument("--variant", choices=("packed", "padded"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.variant:  # a child process: one variant, JSON on stdout
        print("RESULT " + json.dumps(variant(args.variant, args)), flush=True)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    for name in ("packed", "padded"):
        cmd = [sys.executable, __file__, "--variant", name, "--samples", str(args.samples), "--min-len",
               str(args.min_len), "--max-len", str(args.max_len), "--budget", str(args.budget), "--workdir",
               args.workdir, "--lengths", args.lengths]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        print(results[name], flush=True)
    import torch

    on_gpu = torch.cuda.is_available()
    speedup = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    result = {
        "benchmark": "sft_packing",
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"),
        "model": "SDAR-MoE layout: 4 layers, hidden 256, 8 experts top-2",
        "samples": args.samples, "lengths": [args.lengths, args.min_len, args.max_len], "budget": args.budget,
        "results": results, "packed_speedup": speedup, "target_2x_met": speedup >= 2.0,
    }
    out = args.out or os.path.join(REPO, "benchmarks", "results",
                                   f"sft_packing-{'gpu' if on_gpu else 'cpu'}-{args.lengths}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"packed_speedup": speedup, "target_2x_met": speedup >= 2.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
