"""Generate with the native block-diffusion engine.

    python -m dare_mega.rollout --hf DIR --prompt "What is 2+3?" [--policy low_confidence_dynamic]
    python -m dare_mega.rollout --hf DIR --prompts prompts.jsonl --json out.jsonl --seed 0

Each line of --prompts is {"prompt": "text"} (chat-templated by the checkpoint's tokenizer) or
{"prompt_ids": [ints]} (works without tokenizer files). --json writes one JSON line per completion with
prompt_ids, completion_ids, text, finish_reason, logprobs and reveal_steps (one per completion token),
forwards and the full trajectory (generated_*). DIR is an HF checkpoint or a dare_mega torch_dist one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parser() -> argparse.ArgumentParser:
    from dare_mega.rollout.types import POLICIES

    p = argparse.ArgumentParser(prog="python -m dare_mega.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="checkpoint directory (HF, or a dare_mega torch_dist one)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    source.add_argument("--prompts", help="a JSONL file of {prompt} or {prompt_ids} lines")
    p.add_argument("--policy", choices=POLICIES, default="low_confidence_dynamic")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: block size)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--entropy-bound", type=float, default=0.35)
    p.add_argument("--block-size", type=int, default=None, help="default: the family's")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--batch-size", type=int, default=64, help="requests decoded together")
    p.add_argument("--json", help="write one JSON line per completion here")
    p.add_argument("--device", default=None)
    return p


def read_prompts(args) -> list:
    if args.prompt:
        return list(args.prompt)
    from dare_mega.errors import ConfigError

    prompts = []
    with open(args.prompts) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{args.prompts}:{number}: not valid JSON ({e})") from e
            if "prompt_ids" in item:
                prompts.append([int(t) for t in item["prompt_ids"]])
            elif "prompt" in item:
                prompts.append(str(item["prompt"]))
            else:
                raise ConfigError(f"{args.prompts}:{number}: needs 'prompt' or 'prompt_ids'")
    return prompts


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from tqdm import tqdm

    from dare_mega.errors import DareMegaError
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.rollout.types import SamplingParams

    try:
        prompts = read_prompts(args)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, policy=args.policy, steps=args.steps, threshold=args.threshold,
            entropy_bound=args.entropy_bound, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, block_size=args.block_size, stop=tuple(args.stop),
        )
        params.check()
        engine = NativeEngine.from_pretrained(args.hf, device=args.device)
        start = time.perf_counter()
        completions, forwards = [], 0
        out = open(args.json, "w") if args.json else None
        for first in tqdm(range(0, len(prompts), args.batch_size), desc="rollout", unit="batch",
                          disable=len(prompts) <= args.batch_size):
            chunk = prompts[first : first + args.batch_size]
            seeds = tuple(args.seed + first + i for i in range(len(chunk)))
            before = engine.stats["forwards"]
            batch = engine.generate(chunk, SamplingParams(**{**params.__dict__, "seeds": seeds}),
                                    cache=not args.no_cache)
            forwards += engine.stats["forwards"] - before
            completions += batch
            for c in batch:
                if out:
                    out.write(json.dumps(c.to_dict()) + "\n")
        if out:
            out.close()
    except DareMegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    tokens = sum(len(c.completion_ids) for c in completions)
    for i, c in enumerate(completions[:8] if args.json else completions):
        print(f"[{i}] ({c.finish_reason}, {len(c.completion_ids)} tokens, {c.forwards} forwards) {c.text!r}")
    print(f"summary: {len(completions)} completions, {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} "
          f"tokens/s, {forwards} batched forwards = {forwards / max(tokens, 1):.3f} forwards per token, "
          f"{'no cache' if args.no_cache else 'block KV cache'}, policy {params.policy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
