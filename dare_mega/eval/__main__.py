"""Score a model on local benchmark files: `python -m dare_mega.eval --hf DIR --tasks gsm8k,humaneval --data DIR
--out DIR`.

Generates with the native engine (greedy by default, the family's block size and unmasking policy) and scores
with the same rewards as RL (math-verify; code in the sandbox). Writes OUT/scores.json ({task: accuracy}) and
OUT/<task>.jsonl (prompt, completion, score per item). Every dataset is checked before the model is loaded.
The OpenCompass plugin (the standard harness) is the next step of this module; see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dare_mega.errors import DareMegaError
from dare_mega.eval.scoring import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dare_mega.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="an HF checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated: gsm8k, math500, humaneval, mbpp")
    p.add_argument("--data", default=os.environ.get("COMPASS_DATA_CACHE"), help="benchmark files (default "
                   "$COMPASS_DATA_CACHE), e.g. DIR/gsm8k/test.jsonl as GSM8K ships it")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="first N items of each benchmark")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threshold", type=float, default=0.9, help="low_confidence_dynamic threshold")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    options = p.parse_args(argv)
    try:
        from dare_mega.eval.benchmarks import BENCHMARKS, load
        from dare_mega.rollout.engine import NativeEngine
        from dare_mega.rollout.types import SamplingParams

        if not options.data:
            raise DareMegaError("--data (or $COMPASS_DATA_CACHE) must name the directory of benchmark files")
        tasks = [t.strip() for t in options.tasks.split(",") if t.strip()]
        data = {task: load(task, options.data, options.limit) for task in tasks}  # all checked before the model
        engine = NativeEngine.from_pretrained(options.hf, device=options.device)
        os.makedirs(options.out, exist_ok=True)
        scores, clock = {}, time.perf_counter()
        for task in tasks:
            bench = BENCHMARKS[task]
            params = SamplingParams(max_new_tokens=options.max_new_tokens or bench.max_new_tokens,
                                    temperature=options.temperature, threshold=options.threshold, seed=0)
            items = evaluate(engine, data[task], bench.reward, params, options.batch_size)
            with open(os.path.join(options.out, f"{task}.jsonl"), "w") as f:
                for item in items:
                    f.write(json.dumps(item) + "\n")
            scores[task] = sum(i["score"] for i in items) / max(len(items), 1)
            print(f"{task}: {scores[task]:.4f} over {len(items)} items", flush=True)
        with open(os.path.join(options.out, "scores.json"), "w") as f:
            json.dump(scores, f, indent=2)
        print(f"eval: {len(tasks)} task(s) in {time.perf_counter() - clock:.1f} s; scores in "
              f"{os.path.join(options.out, 'scores.json')}", flush=True)
    except DareMegaError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
