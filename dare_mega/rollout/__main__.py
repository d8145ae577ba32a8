"""Generate with the native block-diffusion engine, or on Megatron shards at a parallel layout.

    python -m dare_mega.rollout --hf DIR --prompt "What is 2+3?" [--policy low_confidence_dynamic]
    python -m dare_mega.rollout --hf DIR --prompts prompts.jsonl --json out.jsonl --seed 0
    torchrun --nproc-per-node 4 -m dare_mega.rollout --backend megatron --tp 2 --ep 2 \
        --hf DIR --prompts prompts.jsonl --json out.jsonl

With --backend megatron the prompts are dealt to the data-parallel replicas batch by batch (request i keeps
seed + i, so the tokens do not depend on the layout) and rank 0 writes the JSON in the prompts' order.

Each line of --prompts is {"prompt": "text"} (chat-templated by the checkpoint's tokenizer) or
{"prompt_ids": [ints]} (works without tokenizer files). --json writes one JSON line per completion with
prompt_ids, completion_ids, text, finish_reason, logprobs and reveal_steps (one per completion token),
forwards and the full trajectory (generated_*). DIR is an HF checkpoint or a dare_mega torch_dist one.
Masked diffusion models (LLaDA, Dream) decode with Fast-dLLM's prefix KV cache (--masked-cache dual: its dual
cache; both approximate, rollout/masked_cache.py) unless --no-cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parser() -> argparse.ArgumentParser:
    from dare_mega.rollout.masked_cache import MASKED_CACHES
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
    p.add_argument("--alg-temp", type=float, default=0.0, help="Dream's policies: temperature of the position choice")
    p.add_argument("--eps", type=float, default=1e-3, help="Dream's policies: the schedule's last timestep")
    p.add_argument("--block-size", type=int, default=None, help="default: the family's")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--masked-cache", choices=MASKED_CACHES, default="prefix",
                   help="masked diffusion (LLaDA, Dream): Fast-dLLM's approximate cache, unless --no-cache")
    p.add_argument("--batch-size", type=int, default=64, help="requests decoded together")
    p.add_argument("--json", help="write one JSON line per completion here")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=("native", "megatron"), default="native",
                   help="megatron: the model's Megatron shards at --tp/--pp/--ep/--etp/--vpp (under torchrun)")
    for name in ("tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="megatron: parameters' dtype (auto: bfloat16 on GPUs, float32 on CPUs)")
    return p


def megatron_engine(args):
    """The Megatron backend: process groups at the layout, the model from --hf, a MegatronEngine on it."""
    from dare_mega.data.tokenizer import load_tokenizer
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.models.transformer_config import RuntimeOptions, params_dtype
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel
    from dare_mega.rollout.megatron_engine import MegatronEngine

    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)
    env = init_distributed()
    layout.check_world(env.world_size)
    init_model_parallel(layout, seed=args.seed)
    chunks, model_args = build_from_hf(args.hf, layout, RuntimeOptions(params_dtype=params_dtype(args.dtype, env.device)))
    return MegatronEngine(Runner(chunks, model_args), load_tokenizer(args.hf)), env


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
    from dare_mega.rollout.masked_cache import cache_setting
    from dare_mega.rollout.types import SamplingParams

    try:
        prompts = read_prompts(args)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, policy=args.policy, steps=args.steps, threshold=args.threshold,
            entropy_bound=args.entropy_bound, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            alg_temp=args.alg_temp, eps=args.eps, seed=args.seed, block_size=args.block_size, stop=tuple(args.stop),
        )
        params.check()
        if args.backend == "megatron":
            engine, env = megatron_engine(args)
            replicas, replica, is_main = _replicas(), _replica(), env.is_main
        else:
            engine, replicas, replica, is_main = NativeEngine.from_pretrained(args.hf, device=args.device), 1, 0, True
        start = time.perf_counter()
        completions, forwards = [], 0
        out = open(args.json, "w") if args.json and is_main else None
        step = args.batch_size * replicas  # each replica decodes batch_size of every round's prompts
        for first in tqdm(range(0, len(prompts), step), desc="rollout", unit="batch",
                          disable=len(prompts) <= step or not is_main):
            mine = range(first + replica * args.batch_size, min(first + (replica + 1) * args.batch_size, len(prompts)))
            seeds = tuple(args.seed + i for i in mine)
            before = engine.stats["forwards"]
            batch = engine.generate([prompts[i] for i in mine], SamplingParams(**{**params.__dict__, "seeds": seeds}),
                                    cache=cache_setting(not args.no_cache, args.masked_cache, engine.args))
            forwards += engine.stats["forwards"] - before
            batch = _gather(batch) if replicas > 1 else batch
            completions += batch
            for c in batch:
                if out:
                    out.write(json.dumps(c.to_dict()) + "\n")
        if out:
            out.close()
    except DareMegaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backend == "megatron":
        from dare_mega.parallel import destroy_distributed

        destroy_distributed()
    if not is_main:
        return 0
    seconds = time.perf_counter() - start
    tokens = sum(len(c.completion_ids) for c in completions)
    for i, c in enumerate(completions[:8] if args.json else completions):
        print(f"[{i}] ({c.finish_reason}, {len(c.completion_ids)} tokens, {c.forwards} forwards) {c.text!r}")
    print(f"summary: {len(completions)} completions, {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} "
          f"tokens/s, {forwards} batched forwards = {forwards / max(tokens, 1):.3f} forwards per token, "
          f"cache {cache_setting(not args.no_cache, args.masked_cache, engine.args)}, policy {params.policy}")
    return 0


def _replicas() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _replica() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def _gather(batch: list) -> list:
    """Every replica's completions of this round, in replica order (= the prompts' order)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, batch, group=ps.get_data_parallel_group())
    return [c for part in parts for c in part]


if __name__ == "__main__":
    sys.exit(main())
