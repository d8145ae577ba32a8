"""Megatron vs HF reference logits (and optionally loss and gradients) at one parallel layout.

Run under torchrun, e.g. on CPU:

    torchrun --nproc-per-node 4 tools/check_logits.py --hf DIR --tp 2 --ep 2 --mask block --grads

The last line printed is `max_abs_logit_diff=<float>`. With --save FILE, rank 0 also writes (torch.save) a
dict with input_ids [b, s], position_ids [b, s], attention_mask (bool [b, 1, s, s], True where attention is
allowed) and megatron_logits (float32 [b, s, vocab], padding stripped), so that any other implementation
can be checked against the Megatron model. Exit status 1 when a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF checkpoint directory (config.json, safetensors)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: 1 if ep > 1 else tp)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    p.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    p.add_argument("--mask", choices=("block", "block-causal", "causal", "full"), default=None,
                   help="block: SDAR two-stream training mask; block-causal: inference mask; causal: AR; full: "
                        "masked diffusion, bidirectional within each document (default: full for LLaDA / Dream, "
                        "else block)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per stream (default 16, or two blocks when the block is longer)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--grads", action="store_true", help="also compare the loss and every gradient")
    p.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |diff| allowed (float32)")
    p.add_argument("--save", help="write the batch and the Megatron logits to this file (torch.save)")
    p.add_argument("--json", help="write the figures to this JSON file")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from dare_mega.cli.parity import dense_mask, run_parity
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, destroy_distributed, init_distributed

    if args.mask is None:
        from dare_mega.models.builder import load_model_args

        args.mask = "full" if load_model_args(args.hf).diffusion.attention == "full" else "block"
    env = init_distributed()
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp,
                            moe_dispatcher=args.dispatcher)
    options = RuntimeOptions(attention_backend=args.attention)
    result, batch, logits = run_parity(
        args.hf, layout, args.mask, batch_size=args.batch_size, seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size, grads=args.grads, seed=args.seed, options=options,
    )
    failed = max(result.max_abs_logit_diff, result.max_abs_logprob_diff) > args.tolerance or (
        args.grads and (result.max_abs_grad_diff > args.tolerance
                        or abs(result.loss_megatron - result.loss_reference) > args.tolerance)
    )
    if env.is_main:
        if args.save:
            tmp = f"{args.save}.tmp-{os.getpid()}"
            torch.save({
                "input_ids": batch.input_ids,
                "position_ids": batch.position_ids,
                "attention_mask": dense_mask(batch).clone(),
                "megatron_logits": logits.float(),
                "layout": result.layout,
                "mask": args.mask,
            }, tmp)
            os.replace(tmp, args.save)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**result.to_dict(), "passed": not failed, "tolerance": args.tolerance}, f, indent=2)
        if failed:
            print(f"FAILED: a difference exceeds the tolerance {args.tolerance:g}")
        print("\n".join(result.lines()), flush=True)
    destroy_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
