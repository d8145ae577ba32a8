#!/usr/bin/env python
"""What the trainer's replay of SGLang trajectories costs (rollout/replay.py), against the rollout it replays.

    python benchmarks/replay.py [--train-steps 200] [--new-tokens 256] [--batch 8]

SGLang's responses carry tokens only; for the trajectory estimator the trainer replays the decoding on its own
shards: per denoising step one forward of two-stream rows (twice the sequence) for every block at once. Here the
Megatron backend (TP=1, this process) stands for both sides: it decodes the prompts (block KV cache, sampled at
temperature 1, seeded; what DareMegaDecoding does on a server), then replays the completions from their tokens
alone. The model and prompts are benchmarks/rollout.py's (SDAR-MoE layout, 4 layers, hidden 256, 8 experts,
vocab 512, briefly trained on repeating patterns so that dynamic unmasking reveals several tokens per step).
Reported per block size and policy: rollout and replay seconds, forwards, tokens whose replayed choice differs
(0 on the same model), and replay / rollout time. Result: benchmarks/results/replay-<cpu|cuda>.json;
docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/dare_mega_bench_replay")
    p.add_argument("--model", help="an already trained checkpoint (skips making and training one)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from _results import device_name, write_result
    from rollout import benchmark_model, megatron_engine, patterns

    from dare_mega.rollout.replay import replay
    from dare_mega.rollout.types import SamplingParams

    model_dir, training = benchmark_model(args.workdir, args.train_steps, args.model)
    engine = megatron_engine(model_dir)
    prompts = patterns(args.batch, 16, torch.Generator().manual_seed(1234)).tolist()
    rows = []
    for block in (4, 32):
        for policy in ("low_confidence_static", "low_confidence_dynamic"):
            params = SamplingParams(max_new_tokens=args.new_tokens, policy=policy, threshold=0.9, temperature=1.0,
                                    block_size=block, stop_token_ids=(), seeds=tuple(range(args.batch)))
            engine.generate(prompts[:1], dataclasses.replace(params, seeds=(0,), max_new_tokens=block))  # warm up
            start = engine.stats["forwards"]
            began = time.perf_counter()
            completions = engine.generate(prompts, params)
            rollout_seconds = time.perf_counter() - began
            rollout_forwards = engine.stats["forwards"] - start
            bare = [dataclasses.replace(c, logprobs=[], reveal_steps=[], generated_ids=[], generated_logprobs=[],
                                        generated_reveal_steps=[]) for c in completions]
            replayed, stats = replay(engine, bare, params)
            same = all(a.generated_reveal_steps == b.generated_reveal_steps for a, b in zip(replayed, completions))
            gap = max(abs(x - y) for a, b in zip(replayed, completions)
                      for x, y in zip(a.generated_logprobs, b.generated_logprobs))
            rows.append({"block": block, "policy": policy, "tokens": sum(len(c.completion_ids) for c in completions),
                         "rollout_seconds": rollout_seconds, "rollout_forwards": rollout_forwards,
                         "replay_seconds": stats.seconds, "replay_forwards": stats.forwards,
                         "replay_over_rollout": stats.seconds / rollout_seconds, "mismatched": stats.mismatched,
                         "same_reveal_steps": same, "max_logprob_gap": gap})
            print(rows[-1], flush=True)
    result = {"benchmark": "replay", "device": device_name(torch.get_num_threads()), "date": time.strftime("%Y-%m-%d"),
              "model": "SDAR-MoE layout: 4 layers, hidden 256, 8 experts top-2, vocab 512 (Megatron, TP=1)",
              "training": training or (f"reused {model_dir}" if args.model else "random weights"),
              "batch": args.batch, "new_tokens": args.new_tokens, "rows": rows}
    write_result("replay", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
