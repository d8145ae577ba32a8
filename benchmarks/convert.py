#!/usr/bin/env python
"""Conversion speed and memory: a generated wide MoE checkpoint (>= 2 GB) both ways; writes a JSON result.

    python benchmarks/convert.py [--nproc 2] [--ep 2] [--gb 2.4] [--workdir /tmp/dare_mega_bench_convert]

Generates an SDAR-MoE checkpoint in the published layout (tiny layer count, wide experts, bfloat16), then:
- measures how fast the files can be read (raw 64 MiB reads, and every tensor through safetensors) and how
  fast the same bytes can be written durably (fsync), since a conversion does both;
- runs tools/convert_checkpoint.py hf2mcore and mcore2hf under torchrun and parses their summary lines
  (seconds, GB/s, peak RSS per rank);
- checks the targets: peak RSS per rank under 1 GB + the largest single tensor, and conversion throughput at
  least half the read throughput.
The result goes to benchmarks/results/convert-cpu.json (docs/benchmarks.md keeps the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wide_moe_config(target_gb: float) -> dict:
    from dare_mega.models.presets import load_preset

    cfg = load_preset("tiny-sdar-moe")
    hidden, experts, expert_ffn = 1024, 64, 1024
    per_layer = experts * 3 * hidden * expert_ffn * 2 + (hidden * 2048 + hidden * 1024) * 2
    layers = max(2, round(target_gb * 1e9 / per_layer))
    cfg.update(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
               intermediate_size=2048, num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=4,
               moe_intermediate_size=expert_ffn, vocab_size=4096, torch_dtype="bfloat16")
    return cfg


def read_throughput(directory: str) -> dict:
    files = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith((".safetensors", ".distcp"))]
    total = sum(os.path.getsize(f) for f in files)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(64 << 20):
                pass
    raw = time.perf_counter() - start
    out = {"bytes": total, "raw_seconds": raw, "raw_gb_per_s": total / 1e9 / raw}
    if any(f.endswith(".safetensors") for f in files):
        from dare_mega.storage.safetensors_io import CheckpointReader

        reader = CheckpointReader(directory)
        start = time.perf_counter()
        for name in reader.names():
            reader.get(name).sum()  # touch the data
        tensors = time.perf_counter() - start
        out.update(tensor_seconds=tensors, tensor_gb_per_s=total / 1e9 / tensors)
    return out


def write_throughput(directory: str, nbytes: int) -> dict:
    """Writing the same number of bytes durably (64 MiB writes, fsync): what any conversion must also do."""
    path = os.path.join(directory, "write-probe.bin")
    block = os.urandom(1 << 20) * 64
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return {"bytes": written, "seconds": seconds, "gb_per_s": written / 1e9 / seconds}


def convert(direction: str, hf: str, mcore: str, nproc: int, layout: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", "tools/convert_checkpoint.py", "--direction", direction, "--hf", hf,
           "--mcore", mcore, *layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(direction + ":")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{direction} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    fields = dict(re.findall(r"(\w+)=([0-9.]+)", line))
    return {
        "summary": line,
        "seconds": float(fields["seconds"]),
        "wall_seconds_with_startup": wall,
        "bytes": int(fields["bytes"]),
        "gb_per_s": float(fields["throughput"]),
        "peak_rss_per_rank_max_mib": float(fields["peak_rss_per_rank_max"]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.4, help="size of the generated checkpoint")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/dare_mega_bench_convert")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "convert-cpu.json"))
    args = p.parse_args(argv)

    import torch

    from dare_mega.checkpoint.tiny import make_tiny_checkpoint
    from dare_mega.storage.safetensors_io import CheckpointReader

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    hf, mcore, back = (os.path.join(args.workdir, n) for n in ("hf", "mcore", "hf-back"))
    cfg = wide_moe_config(args.gb)
    start = time.perf_counter()
    make_tiny_checkpoint(hf, preset=cfg, dtype=torch.bfloat16, max_shard_bytes=1 << 30)
    generate = time.perf_counter() - start
    reader = CheckpointReader(hf)
    largest = max(reader.shapes[n][0] * (reader.shapes[n][1] if len(reader.shapes[n]) > 1 else 1) * 2
                  for n in reader.names())
    read = read_throughput(hf)
    write = write_throughput(args.workdir, read["bytes"])
    to_mcore = convert("hf2mcore", hf, mcore, args.nproc, ["--ep", str(args.ep)])
    read_mcore = read_throughput(mcore)
    to_hf = convert("mcore2hf", back, mcore, args.nproc, [])
    rss_limit_mib = 1024 + largest / 2**20
    result = {
        "benchmark": "convert",
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"),
        "checkpoint": {"gb": read["bytes"] / 1e9, "layers": cfg["num_hidden_layers"], "experts": cfg["num_experts"],
                       "dtype": "bfloat16", "largest_tensor_mib": largest / 2**20, "generate_seconds": generate},
        "ranks": args.nproc,
        "layout": f"EP={args.ep}",
        "read_hf": read,
        "write_fsync": write,
        "read_mcore": read_mcore,
        "hf2mcore": to_mcore,
        "mcore2hf": to_hf,
        "targets": {
            "peak_rss_limit_mib": rss_limit_mib,
            "hf2mcore_rss_ok": to_mcore["peak_rss_per_rank_max_mib"] < rss_limit_mib,
            "mcore2hf_rss_ok": to_hf["peak_rss_per_rank_max_mib"] < rss_limit_mib,
            # the target compares with reading the files; writing them durably is the slower bound here
            "hf2mcore_throughput_ok": to_mcore["gb_per_s"] >= 0.5 * read["raw_gb_per_s"],
            "mcore2hf_throughput_ok": to_hf["gb_per_s"] >= 0.5 * read_mcore["raw_gb_per_s"],
            "hf2mcore_vs_write": to_mcore["gb_per_s"] / write["gb_per_s"],
            "mcore2hf_vs_write": to_hf["gb_per_s"] / write["gb_per_s"],
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
