#!/usr/bin/env python
"""Rollout speed of the native engine (block KV cache vs none, static vs dynamic unmasking) and of the Megatron
backend (the trainer's own shards, block KV cache vs none) on the same weights; writes JSON.

    python benchmarks/rollout.py [--train-steps 300] [--new-tokens 256] [--batch 8] [--no-megatron]

The model is tiny but not trivial (SDAR-MoE layout: 4 layers, hidden 256, 8 experts). Dynamic decoding only
saves forwards when the model is confident, so the model is first trained briefly (Megatron, TP=1, the
block-diffusion loss on the two-stream layout) on a synthetic task it can learn: rows repeating a random
pattern of 2 to 6 tokens. Then 8 prompts (16 tokens of unseen patterns) are decoded for 256 new tokens with
block 4 and block 32: no cache vs cache (dynamic, threshold 0.9), and static vs dynamic (cache).
The Megatron backend decodes the same prompts with the same settings, cached and uncached, at TP=1 in this
process.
Reported: tokens/s, and forwards per generated token (per request: prefill, denoising steps and commits).
Result: benchmarks/results/rollout-<device>.json; docs/benchmarks.md keeps the table.

    python benchmarks/rollout.py --masked tiny-llada,tiny-dream [--train-steps 300] [--new-tokens 256]
    python benchmarks/rollout.py --masked llada-8b-instruct --layers 4 --dtype bfloat16 --batch 32 --train-steps 0

Masked diffusion models (LLaDA, Dream; rollout/masked_cache.py): each preset (trained like the SDAR model, with
the masked-token loss, unless --train-steps 0) decodes the same prompts with block 32, uncached, with
Fast-dLLM's prefix cache and with its dual cache, at fixed steps (one token per step) and with threshold
decoding (low_confidence_dynamic, 0.9): tokens/s, forwards per token, and the fraction of tokens identical to
the uncached decode of the same policy (the caches are approximate). Result:
benchmarks/results/rollout-masked-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config() -> dict:
    from _models import small_sdar_moe

    return small_sdar_moe(vocab_size=512)


def patterns(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Rows that repeat a random pattern of 2 to 6 tokens (ids 10..209): learnable by copying."""
    rows = []
    for _ in range(count):
        period = int(torch.randint(2, 7, (1,), generator=generator))
        pattern = torch.randint(10, 210, (period,), generator=generator)
        rows.append(pattern.repeat(length // period + 1)[:length])
    return torch.stack(rows)


def train(hf_dir: str, out_dir: str, steps: int, seq_len: int = 64, batch: int = 16, lr: float = 3e-3) -> dict:
    """A short training run on Megatron (TP=1): the block-diffusion loss on the two-stream layout, or for a
    masked diffusion model (LLaDA, Dream) the masked-token loss with full attention; writes the HF checkpoint."""
    from dare_mega.diffusion.masks import packed_position_ids, two_stream_inputs, two_stream_mask
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.hf_loader import megatron_tensors
    from dare_mega.models.runner import Batch, Runner, wrap_for_training
    from dare_mega.models.weight_mapping import LayoutContext
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel
    from dare_mega.storage.safetensors_io import CheckpointReader, write_hf_checkpoint

    init_distributed()
    init_model_parallel(ParallelLayout())
    chunks, args = build_from_hf(hf_dir, ParallelLayout())
    chunks = wrap_for_training(chunks)
    runner = Runner(chunks, args)
    params = [p for p in chunks[0].parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    positions = packed_position_ids([[seq_len]] * batch, seq_len)
    masked_diffusion = args.diffusion.attention == "full"
    if masked_diffusion:
        mask = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool)
    else:
        mask = two_stream_mask(positions, args.diffusion.block_size)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        clean = patterns(batch, seq_len, g)
        t = torch.rand(batch, 1, generator=g) * 0.9 + 0.1
        masked = torch.rand(batch, seq_len, generator=g) < t
        noisy = torch.where(masked, torch.full_like(clean, args.diffusion.mask_token_id), clean)
        if masked_diffusion:
            rows = Batch(noisy, positions, mask, clean, masked.float() / t)
        else:
            ids, pos = two_stream_inputs(noisy, clean, positions)
            weights = torch.cat([masked.float() / t, torch.zeros(batch, seq_len)], dim=1)
            rows = Batch(ids, pos, mask, torch.cat([clean, clean], 1), weights)
        loss = runner.loss_and_grads(rows, batch)
        for p in params:
            p.grad = p.main_grad.to(p.dtype)
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay
            group["lr"] = lr * (1 - (step + 1) / steps)
        losses.append(loss)
    seconds = time.perf_counter() - start
    table = mapping_for(args)
    ctx = LayoutContext.of(args, padded_vocab=chunks[0].module.vocab_size)
    tensors = {}
    for _, binding, tensor in megatron_tensors(chunks[0], table):
        tensors.update(zip(binding.hf_names, (t.detach().clone() for t in binding.row.to_hf(tensor.data, ctx))))
    source = CheckpointReader(hf_dir)
    skip = ("config.json", "model.safetensors.index.json")
    extra = {f: open(os.path.join(hf_dir, f), "rb").read() for f in os.listdir(hf_dir)
             if not f.endswith(".safetensors") and f not in skip}
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    write_hf_checkpoint(out_dir, {n: tensors[n] for n in source.names()}, config=config, extra_files=extra)
    return {"steps": steps, "seconds": seconds, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / 10}


def benchmark_model(workdir: str, train_steps: int, model: str | None = None, config: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[str, dict | None]:
    """(checkpoint dir, training figures): `model` as given, else a fresh random one of `config` (default: the
    SDAR-MoE layout) in `workdir`, trained for `train_steps` (none when 0)."""
    import shutil

    from dare_mega.checkpoint.tiny import make_tiny_checkpoint

    if model:
        return model, None
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    random_dir = make_tiny_checkpoint(os.path.join(workdir, "random"), preset=config or model_config(), seed=0,
                                      max_shard_bytes=1 << 30, dtype=dtype)
    if not train_steps:
        return random_dir, None
    trained_dir = os.path.join(workdir, "trained")
    return trained_dir, train(random_dir, trained_dir, train_steps)


def megatron_engine(model_dir: str):
    """The Megatron backend on `model_dir` at TP=1 (the process groups of `train`, or new ones)."""
    from megatron.core import parallel_state as ps

    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel
    from dare_mega.rollout.megatron_engine import MegatronEngine

    init_distributed()
    if not ps.model_parallel_is_initialized():
        init_model_parallel(ParallelLayout())
    chunks, args = build_from_hf(model_dir, ParallelLayout())
    return MegatronEngine(Runner(chunks, args))


def measure(engine, prompts, params, cache: bool | str, keep: list | None = None) -> dict:
    """tokens/s and forwards per token of one batched generate (after a one-prompt warm-up); the completions
    are appended to `keep` when given."""
    engine.generate(prompts[:1], params, cache=cache)  # warm up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    completions = engine.generate(prompts, params, cache=cache)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(c.completion_ids) for c in completions)
    if keep is not None:
        keep.extend(completions)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "forwards_per_token": sum(c.forwards for c in completions) / tokens,
    }


# ---- masked diffusion (LLaDA, Dream): Fast-dLLM's caches and threshold decoding -------------------------------

def masked_config(preset: str, layers: int | None) -> dict:
    """A masked diffusion preset (tiny-llada, tiny-dream, llada-8b-instruct, ...), with `layers` layers."""
    from dare_mega.models.presets import load_preset

    cfg = load_preset(preset)
    if layers:  # LLaDA's config names it n_layers, Dream's (Qwen2's) num_hidden_layers
        cfg["n_layers" if "n_layers" in cfg else "num_hidden_layers"] = layers
    return cfg


def agreement(ours, theirs) -> float:
    """Fraction of the generated tokens identical to the uncached decode's, position by position."""
    pairs = [(a, b) for x, y in zip(ours, theirs) for a, b in zip(x.generated_ids, y.generated_ids)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def masked_benchmark(preset: str, args) -> dict:
    """Uncached vs Fast-dLLM's prefix and dual caches, fixed steps (one token per step) vs threshold decoding,
    on one masked diffusion model: tokens/s, forwards per token, agreement with the uncached decode."""
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.rollout.types import SamplingParams

    dtype = getattr(torch, args.dtype)
    workdir = os.path.join(args.workdir, preset)
    config = masked_config(preset, args.layers)
    model_dir, training = benchmark_model(workdir, args.train_steps, args.model, config, dtype)
    engine = NativeEngine.from_pretrained(model_dir, dtype=dtype, tokenizer=False)
    prompts = patterns(args.batch, 16, torch.Generator().manual_seed(1234)).tolist()
    rows = []
    for policy in ("low_confidence_static", "low_confidence_dynamic"):
        params = SamplingParams(max_new_tokens=args.new_tokens, policy=policy, threshold=args.threshold,
                                temperature=0.0, block_size=args.block, stop_token_ids=())
        uncached = []
        for cache in ("none", "prefix", "dual"):
            decoded = []
            row = {"policy": policy, "cache": cache, **measure(engine, prompts, params, cache, decoded)}
            if cache == "none":
                uncached = decoded
            row["agreement"] = agreement(decoded, uncached)
            rows.append(row)
            print(preset, row, flush=True)

    def rate(policy, cache):
        return next(r for r in rows if r["policy"] == policy and r["cache"] == cache)

    static, dynamic = "low_confidence_static", "low_confidence_dynamic"
    return {
        "preset": preset,
        "layers": args.layers,
        "dtype": args.dtype,
        "training": training or (f"reused {model_dir}" if args.model else "none (random weights)"),
        "rows": rows,
        "cache_speedup": {f"{policy.split('_')[-1]}_{cache}": rate(policy, cache)["tokens_per_s"]
                          / rate(policy, "none")["tokens_per_s"]
                          for policy in (static, dynamic) for cache in ("prefix", "dual")},
        "threshold_forwards_ratio": {cache: rate(dynamic, cache)["forwards_per_token"]
                                     / rate(static, cache)["forwards_per_token"]
                                     for cache in ("none", "prefix", "dual")},
        # DARE reports 2.2x for Fast-dLLM's cache on LLaDA-8B's rollouts
        "targets": {"prefix_cache_at_least_2.2x": rate(static, "prefix")["tokens_per_s"]
                    / rate(static, "none")["tokens_per_s"] >= 2.2,
                    "threshold_fewer_forwards_per_token": rate(dynamic, "none")["forwards_per_token"]
                    < rate(static, "none")["forwards_per_token"]},
    }


def masked_main(args) -> int:
    on_gpu = torch.cuda.is_available()
    result = {
        "benchmark": "rollout-masked",
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "block": args.block,
        "threshold": args.threshold,
        "models": [masked_benchmark(preset, args) for preset in args.masked.split(",")],
    }
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"rollout-masked-{'gpu' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps([{k: m[k] for k in ("preset", "cache_speedup", "threshold_forwards_ratio", "targets")}
                      for m in result["models"]], indent=2))
    return 0


def speed_main(args) -> int:
    """Native engine (no cache; cache on the host loop; cache on the device loop) vs transformers' loop."""
    from hf_block_decoding import hf_block_decode

    from dare_mega.models.sdar.hf_reference import hf_reference_model
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.rollout.types import SamplingParams

    dtype = getattr(torch, args.dtype)
    config = masked_config(args.speed, args.layers)
    model_dir, _ = benchmark_model(os.path.join(args.workdir, args.speed), 0, args.model, config, dtype)
    engine = NativeEngine.from_pretrained(model_dir, dtype=dtype, tokenizer=False)
    engine_args = engine.args
    prompts = patterns(args.batch, 16, torch.Generator().manual_seed(1234)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, policy="low_confidence_dynamic", threshold=args.threshold,
                            temperature=0.0, block_size=4, stop_token_ids=())
    rows, decoded = [], []
    for name, cache, on_device in (("native, no cache", False, False), ("native, cache, host loop", True, False),
                                   ("native, cache, device loop", True, True)):
        engine.device_loop = on_device
        rows.append({"engine": name, **measure(engine, prompts, params, cache, decoded if on_device else None)})
        print(rows[-1], flush=True)
    del engine
    model = hf_reference_model(model_dir, dtype, attn_implementation="sdpa").to(
        "cuda" if torch.cuda.is_available() else "cpu").eval()
    mask_id = engine_args.diffusion.mask_token_id
    batch = torch.tensor(prompts)
    hf_block_decode(model, batch[:1], 8, 4, args.threshold, mask_id)  # warm up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    canvas, forwards = hf_block_decode(model, batch, args.new_tokens, 4, args.threshold, mask_id)
    sync()
    seconds = time.perf_counter() - start
    tokens = args.batch * args.new_tokens
    ours = torch.tensor([c.completion_ids for c in decoded])
    theirs = canvas[:, batch.shape[1] : batch.shape[1] + args.new_tokens].cpu()
    rows.append({"engine": "transformers, KV cache", "tokens": tokens, "seconds": seconds,
                 "tokens_per_s": tokens / seconds, "forwards_per_token": forwards / args.new_tokens,
                 # the same greedy decode: positions where transformers' tokens equal the device loop's
                 "agreement_with_device_loop": float((ours == theirs).float().mean())})
    print(rows[-1], flush=True)
    rate = {r["engine"]: r["tokens_per_s"] for r in rows}
    on_gpu = torch.cuda.is_available()
    result = {
        "benchmark": "rollout-speed",
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.speed, "layers": args.layers, "dtype": args.dtype, "batch": args.batch,
        "new_tokens": args.new_tokens, "block": 4, "threshold": args.threshold, "rows": rows,
        "device_loop_over_host_loop": rate["native, cache, device loop"] / rate["native, cache, host loop"],
        "device_loop_over_transformers": rate["native, cache, device loop"] / rate["transformers, KV cache"],
        "targets": {"device_loop_at_least_2x_host_loop":
                    rate["native, cache, device loop"] >= 2 * rate["native, cache, host loop"],
                    "ahead_of_transformers": rate["native, cache, device loop"] > rate["transformers, KV cache"]},
    }
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"rollout-speed-{'gpu' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("device_loop_over_host_loop", "device_loop_over_transformers", "targets")},
                     indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/dare_mega_bench_rollout")
    p.add_argument("--model", help="an already trained checkpoint (skips making and training one)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-megatron", action="store_true", help="skip the Megatron backend")
    p.add_argument("--speed", help="a block-diffusion preset: host vs device loop vs transformers' loop (see above)")
    masked = p.add_argument_group("masked diffusion (Fast-dLLM's caches and threshold decoding)")
    masked.add_argument("--masked", help="comma-separated masked diffusion presets (tiny-llada,tiny-dream or "
                        "llada-8b-instruct): benchmark these instead of the SDAR-MoE model")
    masked.add_argument("--layers", type=int, default=None, help="--masked: override the preset's layer count")
    masked.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    masked.add_argument("--block", type=int, default=32, help="--masked: block length (LLaDA's 32)")
    masked.add_argument("--threshold", type=float, default=0.9, help="--masked: Fast-dLLM's threshold")
    args = p.parse_args(argv)
    if args.masked:
        return masked_main(args)
    if args.speed:
        return speed_main(args)

    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.rollout.types import SamplingParams

    model_dir, training = benchmark_model(args.workdir, args.train_steps, args.model)
    engine = NativeEngine.from_pretrained(model_dir, tokenizer=False)
    prompts = patterns(args.batch, 16, torch.Generator().manual_seed(1234)).tolist()
    rows = []
    for block in (4, 32):
        for policy, cache in (("low_confidence_static", False), ("low_confidence_static", True),
                              ("low_confidence_dynamic", False), ("low_confidence_dynamic", True)):
            params = SamplingParams(max_new_tokens=args.new_tokens, policy=policy, threshold=0.9, temperature=0.0,
                                    block_size=block, stop_token_ids=())
            rows.append({"backend": "native", "block": block, "policy": policy, "cache": cache,
                         **measure(engine, prompts, params, cache)})
            print(rows[-1], flush=True)
    if not args.no_megatron:
        megatron = megatron_engine(model_dir)
        for block in (4, 32):
            for policy in ("low_confidence_static", "low_confidence_dynamic"):
                params = SamplingParams(max_new_tokens=args.new_tokens, policy=policy, threshold=0.9,
                                        temperature=0.0, block_size=block, stop_token_ids=())
                for cache in (False, True):
                    rows.append({"backend": "megatron", "block": block, "policy": policy, "cache": cache,
                                 **measure(megatron, prompts, params, cache)})
                    print(rows[-1], flush=True)
    def rate(block, policy, cache, backend="native"):
        return next(r for r in rows if r["block"] == block and r["policy"] == policy and r["cache"] == cache
                    and r["backend"] == backend)

    speedup = {f"{policy.split('_')[-1]}_block{b}": rate(b, policy, True)["tokens_per_s"] / rate(b, policy, False)["tokens_per_s"]
               for b in (4, 32) for policy in ("low_confidence_static", "low_confidence_dynamic")}
    on_gpu = torch.cuda.is_available()
    result = {
        "benchmark": "rollout",
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"),
        "model": "SDAR-MoE layout: 4 layers, hidden 256, 8 experts top-2, vocab 512",
        "training": training or f"reused {model_dir}",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "cache_speedup": speedup,
        # Megatron tokens/s over the native engine's, each with and without the cache
        "megatron_vs_native": {} if args.no_megatron else {
            f"{policy.split('_')[-1]}_block{b}_{'cache' if cache else 'nocache'}":
            rate(b, policy, cache, "megatron")["tokens_per_s"] / rate(b, policy, cache)["tokens_per_s"]
            for b in (4, 32) for policy in ("low_confidence_static", "low_confidence_dynamic") for cache in (False, True)},
        "targets": {
            "cache_at_least_3x": {k: v >= 3.0 for k, v in speedup.items()},
            "dynamic_under_0.5_forwards_per_token": {
                f"block{b}": rate(b, "low_confidence_dynamic", True)["forwards_per_token"] < 0.5 for b in (4, 32)},
        },
    }
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"rollout-{'gpu' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("training", "cache_speedup", "megatron_vs_native", "targets")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
