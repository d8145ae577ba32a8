"""HF <-> Megatron torch_dist checkpoint conversion, streamed, under torchrun (CPU processes are enough).

    torchrun --nproc-per-node 4 tools/convert_checkpoint.py --direction hf2mcore \\
        --hf /ckpt/SDAR-30B-A3B-Chat --mcore /ckpt/sdar30b-mcore --tp 2 --ep 2 [--verify]
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py --direction mcore2hf \\
        --mcore /ckpt/sdar30b-mcore --hf /ckpt/sdar30b-hf [--verify --tp 2 --ep 2]

hf2mcore: each rank reads only the HF tensors of the shards it writes, one tensor at a time, and writes a
torch_dist checkpoint that loads at any layout. mcore2hf: ranks split the output shard files (<= 5 GB);
tensor names, dtypes and shapes are the source's. --verify then compares the Megatron model (loaded from the
torch_dist side) with the HF reference (loaded from the HF side) at --tp/--pp/--ep and fails on a mismatch.
Conversion runs on CPUs (CUDA is not used). Errors name the file or tensor and exit with status 2; an
interrupted run leaves only a hidden `.<name>.partial` directory, never an output that looks complete.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direction", choices=("hf2mcore", "mcore2hf"), required=True)
    p.add_argument("--hf", required=True, help="HF checkpoint directory (source for hf2mcore, output for mcore2hf)")
    p.add_argument("--mcore", required=True, help="torch_dist directory (output for hf2mcore, source for mcore2hf)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="mcore2hf: largest output shard (GB)")
    p.add_argument("--verify", action="store_true", help="compare logits of the result with the HF reference")
    p.add_argument("--tolerance", type=float, default=1e-5, help="--verify: max |logit diff| (float32 models)")
    return p


class _Progress:
    """A bytes and tensors progress bar on rank 0 (tqdm)."""

    def __init__(self, desc: str, total_bytes: int | None, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=not enabled, dynamic_ncols=True)
        self.tensors = 0

    def __call__(self, nbytes: int, ntensors: int) -> None:
        self.tensors += ntensors
        self.bar.update(nbytes)
        self.bar.set_postfix(tensors=self.tensors, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _summary(direction: str, stats: dict, seconds: float) -> str | None:
    """Sum figures over ranks, max of peak RSS; the line printed by rank 0."""
    import torch
    import torch.distributed as dist

    values = torch.tensor([stats["tensors"], stats["bytes"], _peak_rss_bytes()], dtype=torch.float64)
    totals = values.clone()
    dist.all_reduce(totals[:2])
    peak = values[2:].clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() != 0:
        return None
    gb = totals[1].item() / 1e9
    return (f"{direction}: tensors={int(totals[0].item())} bytes={int(totals[1].item())} ({gb:.3f} GB) "
            f"seconds={seconds:.1f} throughput={gb / max(seconds, 1e-9):.3f} GB/s "
            f"peak_rss_per_rank_max={peak.item() / 2**20:.0f} MiB ranks={dist.get_world_size()}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion is CPU work; keep GPUs free and the path gloo
    from dare_mega.errors import DareMegaError
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed, init_model_parallel

    env = init_distributed()
    try:
        layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)
        start = time.time()
        if args.direction == "hf2mcore":
            from dare_mega.checkpoint.torch_dist import save_from_hf

            init_model_parallel(layout)
            progress = _Progress("hf2mcore (read)", None, env.is_main)
            result = save_from_hf(args.hf, args.mcore, layout, progress=progress)
            progress.close()
            stats = {"tensors": result["tensors_read"], "bytes": result["bytes_read"]}
        else:
            from dare_mega.checkpoint.export import export_to_hf
            from dare_mega.checkpoint.torch_dist import read_meta

            meta = read_meta(args.mcore)
            total = sum(_tensor_bytes(t) for t in meta["hf_tensors"].values())
            progress = _Progress("mcore2hf (write)", total, env.is_main)
            result = export_to_hf(args.mcore, args.hf, int(args.max_shard_gb * 1e9), progress=progress)
            progress.close()
            stats = {"tensors": result["tensors_written"], "bytes": result["bytes_written"]}
        line = _summary(args.direction, stats, time.time() - start)
        if line:
            print(line, flush=True)
        status = 0
        if args.verify:
            status = _verify(args, layout, env)
    except DareMegaError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    destroy_distributed()
    return status


def _tensor_bytes(entry: dict) -> int:
    import torch

    from dare_mega.checkpoint.torch_dist import DTYPES

    count = 1
    for d in entry["shape"]:
        count *= d
    return count * torch.empty((), dtype=DTYPES[entry["dtype"]]).element_size()


def _verify(args, layout, env) -> int:
    from dare_mega.cli.parity import run_parity

    result, _, _ = run_parity(args.hf, layout, "block", grads=False, mcore_dir=args.mcore)
    ok = result.max_abs_logit_diff <= args.tolerance
    if env.is_main:
        side = "torch_dist" if args.direction == "hf2mcore" else "exported HF"
        print(f"verify ({side} vs HF reference at {result.layout}): max_abs_logit_diff="
              f"{result.max_abs_logit_diff:.3e} {'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
