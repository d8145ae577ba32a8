"""`python -m dare_mega`: the foundation's parity check on the embedded default.

It writes a tiny SDAR-MoE checkpoint in the published layout, launches torchrun at TP=2 x EP=2 (4 processes:
on the GPUs when there are 4, else on the CPU with gloo), loads the checkpoint into Megatron-Core, and prints
how far its logits, loss and gradients are from transformers' reference model. The main job of README.md (SFT
then RL on the tiny SDAR-MoE) is `bash examples/rl_sdar_moe.sh`; the trainers are `python -m
dare_mega.trainer.sft` and `python -m dare_mega.trainer.rl`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from dare_mega.paths import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parity(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m dare_mega parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sdar-moe", help="a preset of configs/models/ (tiny ones run on CPU)")
    p.add_argument("--hf", help="an HF checkpoint directory instead of a tiny one made from --preset")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--mask", default=None, choices=("block", "block-causal", "causal", "full"),
                   help="the parity batch's mask (default: full for masked-diffusion models, else block)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when GPUs are present")
    args = p.parse_args(argv)

    import torch

    from dare_mega.checkpoint.tiny import cached_tiny_checkpoint

    hf_dir = args.hf or cached_tiny_checkpoint(args.preset)
    # torchrun sets these for its children; stale values from a calling process must not leak in
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    use_gpus = not args.cpu and torch.cuda.is_available() and torch.cuda.device_count() >= args.nproc
    if not use_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    device = f"{args.nproc} GPUs (nccl)" if use_gpus else f"CPU, {args.nproc} processes (gloo)"
    print(f"dare_mega: parity of {hf_dir}\n  layout TP={args.tp} x PP={args.pp} x EP={args.ep} on {device}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "parity.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
            "-m", "dare_mega.cli.check_logits", "--hf", hf_dir, "--tp", str(args.tp), "--pp", str(args.pp),
            "--ep", str(args.ep), *(["--mask", args.mask] if args.mask else []), "--grads", "--micro-batch-size", "1",
            "--json", report,
        ]
        start = time.time()
        proc = subprocess.run(cmd, env=env, cwd=str(REPO_ROOT), capture_output=True, text=True)
        if proc.returncode not in (0, 1) or not os.path.exists(report):
            sys.stdout.write(proc.stdout[-4000:])
            sys.stderr.write(proc.stderr[-8000:])
            print(f"dare_mega: the parity run failed (exit status {proc.returncode})")
            return proc.returncode or 1
        import json

        with open(report) as f:
            r = json.load(f)
    print(f"  logits: max |megatron - transformers| = {r['max_abs_logit_diff']:.3e}")
    print(f"  loss:   megatron {r['loss_megatron']:.6f}, transformers {r['loss_reference']:.6f}")
    print(f"  grads:  max |diff| = {r['max_abs_grad_diff']:.3e} over {r['tensors_compared']} tensors on rank 0")
    verdict = "PASS" if r["passed"] else "FAIL"
    print(f"{verdict}: tolerance {r['tolerance']:g}, {time.time() - start:.1f} s")
    return 0 if r["passed"] else 1


COMMANDS = {"parity": parity}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "parity"
    return COMMANDS[command](argv)


if __name__ == "__main__":
    sys.exit(main())
