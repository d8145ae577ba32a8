#!/usr/bin/env python
"""Megatron vs the HF reference on whatever device is present (one process under torchrun: NCCL on a GPU).

    python benchmarks/cuda_parity.py [--tolerance 1e-5] [--out FILE]

The CPU tests (tests/test_parity.py) hide the GPUs from their workers; this runs the same comparison
(dare_mega/cli/parity.py: logits, vocab-parallel log-probs, the loss and every gradient) with the GPU
visible, so the Megatron model runs on CUDA with the GPU attention kernel ("auto": compiled FlexAttention with
the block-sparse BlockMask) and the reference runs in float32 on the CPU. Cases: the three tiny families with
the SDAR two-stream training mask and gradients, the MoE with the inference mask in micro-batches of 2, and
the dense model with SDPA. Pass: every difference <= --tolerance (1e-5 by default, the CPU tests' figure).
Result: benchmarks/results/parity-<device>.json (or --out); the last line is PASS or FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def cases(dirs: dict) -> list[dict]:
    def case(family, mask="block", attention="auto", grads=True, micro_batch_size=1):
        return {"family": family, "hf": dirs[family], "mask": mask, "attention": attention, "grads": grads,
                "micro_batch_size": micro_batch_size}

    return [case("sdar"), case("sdar_moe"), case("llada2_moe"),
            case("sdar_moe", mask="block-causal", grads=False, micro_batch_size=2), case("sdar", attention="sdpa")]


def worker(spec_path: str, out_path: str) -> None:
    import torch

    from dare_mega.cli.parity import run_parity
    from dare_mega.diffusion.attention import resolve_backend
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed

    env = init_distributed()
    results = []
    for case in json.load(open(spec_path)):
        start = time.time()
        result, _, _ = run_parity(case["hf"], ParallelLayout(), case["mask"], micro_batch_size=case["micro_batch_size"],
                                  grads=case["grads"], options=RuntimeOptions(attention_backend=case["attention"]))
        results.append({**case, **result.to_dict(), "wall_seconds": time.time() - start, "backend": env.backend,
                        "device": str(env.device), "attention_kernel": resolve_backend(case["attention"])})
        print(json.dumps(results[-1]), flush=True)
    if env.is_main:
        info = {"device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
                "torch": torch.__version__}
        with open(out_path, "w") as f:
            json.dump({**info, "cases": results}, f, indent=2)
    destroy_distributed()


def failures_of(r: dict, tol: float) -> list[str]:
    out = []
    if not r["max_abs_logit_diff"] <= tol:
        out.append(f"logits differ by {r['max_abs_logit_diff']:.3e}")
    if not r["max_abs_logprob_diff"] <= tol:
        out.append(f"log-probs differ by {r['max_abs_logprob_diff']:.3e}")
    if r["grads"]:
        if not abs(r["loss_megatron"] - r["loss_reference"]) <= tol:
            out.append(f"loss {r['loss_megatron']:.8f} vs {r['loss_reference']:.8f}")
        if not r["max_abs_grad_diff"] <= tol or r["tensors_compared"] == 0:
            out.append(f"gradients differ by {r['max_abs_grad_diff']:.3e} ({r['tensors_compared']} tensors)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--out")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0

    import torch

    from dare_mega.checkpoint.tiny import make_tiny_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {family: make_tiny_checkpoint(os.path.join(tmp, preset), preset=preset, seed=0)
                for family, preset in (("sdar", "tiny-sdar"), ("sdar_moe", "tiny-sdar-moe"),
                                       ("llada2_moe", "tiny-llada2-moe"))}
        spec, out = os.path.join(tmp, "cases.json"), os.path.join(tmp, "results.json")
        with open(spec, "w") as f:
            json.dump(cases(dirs), f)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK")}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                   "127.0.0.1", "--master-port", str(port), os.path.abspath(__file__), "--worker", spec, out]
        start = time.time()
        proc = subprocess.run(command, cwd=REPO, env=env)
        if proc.returncode or not os.path.exists(out):
            print(f"FAIL: the parity worker exited with status {proc.returncode}")
            return 1
        report = json.load(open(out))
    report.update(tolerance=args.tolerance, seconds=time.time() - start, date=time.strftime("%Y-%m-%d"))
    print(f"parity on {report['device']} (torch {report['torch']}), tolerance {args.tolerance:g}:")
    failed = []
    for r in report["cases"]:
        problems = failures_of(r, args.tolerance)
        r["passed"] = not problems
        name = f"{r['family']:10s} mask {r['mask']:12s} {r['attention_kernel']:4s} mb{r['micro_batch_size']}"
        grads = (f"loss diff {abs(r['loss_megatron'] - r['loss_reference']):.2e}  grads {r['max_abs_grad_diff']:.2e}"
                 if r["grads"] else "no grads")
        print(f"  {name}  [{r['backend']} {r['device']}]  logits {r['max_abs_logit_diff']:.2e}  "
              f"logp {r['max_abs_logprob_diff']:.2e}  {grads}  {r['wall_seconds']:.1f} s  "
              f"{'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
        if problems:
            failed.append(name.split()[0])
    path = args.out or os.path.join(REPO, "benchmarks", "results", f"parity-{device}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    if device == "cuda" and any(r["backend"] != "nccl" or not r["device"].startswith("cuda") for r in report["cases"]):
        print("FAIL: a GPU is present but the worker did not run on it with NCCL")
        return 1
    if failed:
        print(f"FAIL: {len(failed)} of {len(report['cases'])} cases exceed the tolerance {args.tolerance:g}")
        return 1
    print(f"PASS: {len(report['cases'])} cases within {args.tolerance:g}, {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
