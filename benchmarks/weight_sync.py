#!/usr/bin/env python
"""Weight sync throughput: export (+ transport) of a >= 1 GB model at TP=2 x EP=2, against memcpy bandwidth.

    python benchmarks/weight_sync.py [--layers 6] [--experts 32] [--bucket-mb 512] [--repeat 2] [--tp 2 --ep 2]
    python benchmarks/weight_sync.py --tp 1 --ep 1        # one GPU: one process, no gathers

Makes an SDAR-MoE checkpoint of about 1.2 GB (fp32), loads it at TP=2 x EP=2 on 4 processes (gloo on CPU,
NCCL on GPUs: one GPU per process, so a machine with fewer GPUs than TP x EP processes needs --tp/--ep, or
CUDA_VISIBLE_DEVICES= for the CPU), and times, per sync:
  export-all     buckets of full HF tensors delivered to every rank (what in-process and CUDA-IPC need)
  export-rank0   buckets delivered to rank 0 only (what disk and the NCCL broadcast to engines need)
  in-process     export-all + loading every bucket into a native engine on each rank (the RL default)
and, in the same run, the machine's memcpy bandwidth (one large tensor copy on rank 0). Peak RSS growth per
rank during a sync is recorded to check the "one bucket" memory bound (on GPUs also the growth of CUDA memory
allocated). Result:
benchmarks/results/weight_sync-<device>.json; docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def model_config(layers: int, experts: int) -> dict:
    from _models import small_sdar_moe

    return small_sdar_moe(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, intermediate_size=2048,
                          num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=4,
                          moe_intermediate_size=512)


class PeakRSS:
    """Samples this process's RSS every 5 ms; `.peak - .start` is the growth during the block."""

    def __enter__(self):
        import psutil

        self.proc, self.stop = psutil.Process(), False
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def memcpy_gbps(nbytes: int, device) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - clock)
    return nbytes / best / 1e9


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed, init_model_parallel
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.weight_sync.export import WeightExporter
    from dare_mega.weight_sync.sync import WeightSync
    from dare_mega.weight_sync.transports import InProcessTransport

    env = init_distributed()
    layout = ParallelLayout(tp=args.tp, ep=args.ep)
    on_gpu = env.device.type == "cuda"
    init_model_parallel(layout)
    chunks, model_args = build_from_hf(args.hf, layout)
    exporter = WeightExporter(chunks, model_args, mapping_for(model_args), args.bucket_mb * 1024**2)
    total = exporter.plan.total_bytes
    out = {"model_bytes": total, "buckets": len(exporter.plan.buckets), "bucket_mb": args.bucket_mb}

    def timed(name, run):
        seconds, growth, cuda_growth = [], [], []
        for _ in range(args.repeat):
            dist.barrier()
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                cuda_start = torch.cuda.memory_allocated()
            with PeakRSS() as rss:
                clock = time.perf_counter()
                run()
                if on_gpu:
                    torch.cuda.synchronize()
                dist.barrier()
                seconds.append(time.perf_counter() - clock)
            growth.append(rss.peak - rss.start)
            cuda_growth.append(torch.cuda.max_memory_allocated() - cuda_start if on_gpu else 0)
        worst = torch.tensor([max(growth), exporter.peak_held_bytes, max(cuda_growth)], dtype=torch.float64,
                             device=env.device if env.backend == "nccl" else "cpu")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out[name] = {"seconds": min(seconds), "gb_per_s": total / min(seconds) / 1e9,
                     "peak_rss_growth_mb_max_rank": float(worst[0]) / 2**20,
                     "peak_held_mb_max_rank": float(worst[1]) / 2**20}
        if on_gpu:
            out[name]["peak_cuda_allocated_growth_mb_max_rank"] = float(worst[2]) / 2**20
        exporter.peak_held_bytes = 0

    def drain(receivers):
        for bucket in exporter.buckets(receivers):
            del bucket

    timed("export-all", lambda: drain("all"))
    timed("export-rank0", lambda: drain(0))
    engine = NativeEngine.from_pretrained(args.hf, tokenizer=False)
    sync = WeightSync(exporter, InProcessTransport(engine))
    version = iter(range(1, 100))
    timed("in-process", lambda: sync.sync(next(version)))
    if env.is_main:
        out["memcpy_gb_per_s"] = memcpy_gbps(1 << 30, env.device)
        with open(args.out, "w") as f:
            json.dump(out, f)
    destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--hf")
    p.add_argument("--out", help="where the result goes (default benchmarks/results/weight_sync-<device>.json)")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from dare_mega.checkpoint.tiny import make_tiny_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    nproc = args.tp * args.ep
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise SystemExit(f"TP={args.tp} x EP={args.ep} needs {nproc} GPUs (NCCL: one process per GPU), "
                         f"{torch.cuda.device_count()} visible: pass --tp/--ep, or CUDA_VISIBLE_DEVICES= for the CPU")
    with tempfile.TemporaryDirectory() as workdir:
        hf = os.path.join(workdir, "model")
        make_tiny_checkpoint(hf, preset=model_config(args.layers, args.experts), max_shard_bytes=1 << 30)
        result_file = os.path.join(workdir, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                   "29541", __file__, "--worker", "--hf", hf, "--out", result_file, "--bucket-mb", str(args.bucket_mb),
                   "--repeat", str(args.repeat), "--tp", str(args.tp), "--ep", str(args.ep)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-4000:])
        result = json.load(open(result_file))
    result["device"] = (torch.cuda.get_device_name() if device == "cuda"
                        else f"cpu ({platform.machine()}, {nproc} processes)")
    result["layout"] = f"TP={args.tp} x EP={args.ep} ({nproc} process{'es' if nproc > 1 else ''})"
    for name in ("export-all", "export-rank0", "in-process"):
        r = result[name]
        r["fraction_of_memcpy"] = r["gb_per_s"] / result["memcpy_gb_per_s"]
        print(f"{name:13s} {r['seconds']:.2f} s  {r['gb_per_s']:.3f} GB/s  ({r['fraction_of_memcpy']:.1%} of memcpy)  "
              f"peak RSS growth {r['peak_rss_growth_mb_max_rank']:.0f} MiB, exported bytes held at once "
              f"{r['peak_held_mb_max_rank']:.0f} MiB")
    print(f"model {result['model_bytes'] / 1e9:.2f} GB in {result['buckets']} buckets of <= {args.bucket_mb} MiB; "
          f"memcpy {result['memcpy_gb_per_s']:.2f} GB/s")
    path = args.out or os.path.join(REPO, "benchmarks", "results", f"weight_sync-{device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
