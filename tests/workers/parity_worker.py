"""Runs parity cases at one world size (under torchrun) and writes their figures as JSON (rank 0).

Each case: {"hf": dir, "layout": {...ParallelLayout fields}, "mask": kind, "micro_batch_size": m,
"batch_size": b, "attention": backend, "grads": bool}, or {"router": true, "hf": dir, "layout": {...}}: the router
comparison of tests/workers/router_worker.py at that layout.
"""

import json
import sys

from _common import finish


def main():
    from dare_mega.cli.parity import run_parity
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, init_distributed

    env = init_distributed()
    cases = json.load(open(sys.argv[1]))
    results = []
    for case in cases:
        if case.get("router"):  # the router check of tests/workers/router_worker.py, in this launch
            from router_worker import router_report

            results.append({"router": router_report(case["hf"], case["layout"])})
            continue
        layout = ParallelLayout(**case["layout"])
        result, batch, logits = run_parity(
            case["hf"], layout, case.get("mask", "block"), batch_size=case.get("batch_size", 4),
            seq_len=case.get("seq_len", 16), micro_batch_size=case.get("micro_batch_size", 1),
            grads=case.get("grads", True),
            options=RuntimeOptions(attention_backend=case.get("attention", "auto"),
                                   moe_experts=case.get("experts", "auto")),
        )
        results.append({**case, **result.to_dict(), "logits_sum": float(logits.double().sum())})
    finish(env, sys.argv[2], results)


if __name__ == "__main__":
    main()
