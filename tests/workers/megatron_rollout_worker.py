"""Decodes with the Megatron rollout backend at one layout (under torchrun) and writes the completions (rank 0).

Spec: {"cases": [{"hf": dir, "layout": {...ParallelLayout fields}, "params": [SamplingParams fields, ...],
"caches": [true, false] (the default: with and without the block KV cache)}], "prompts": [[ids], ...]}. Prompt i keeps seed 1000 + i; replica r decodes prompts r, r + dp, ... (uneven
shares, so that replicas finish at different forwards). With the cache, the last parameters' completions stripped
to their tokens are also replayed on the same shards (rollout/replay.py: what the trainer does with SGLang's) and written as
"replayed".
"""

import dataclasses
import json
import sys

from _common import finish


def main():
    from megatron.core import parallel_state as ps

    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel
    from dare_mega.rollout.megatron_engine import MegatronEngine
    from dare_mega.rollout.replay import replay
    from dare_mega.rollout.types import SamplingParams

    spec = json.load(open(sys.argv[1]))
    prompts = spec["prompts"]
    env = init_distributed()
    results = []
    for case in spec["cases"]:
        layout = ParallelLayout(**case["layout"])
        init_model_parallel(layout, seed=0)
        chunks, args = build_from_hf(case["hf"], layout)
        engine = MegatronEngine(Runner(chunks, args))
        dp, replica = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(replica, len(prompts), dp))
        for fields, cache in ((f, c) for f in case["params"] for c in case.get("caches", (True, False))):
            params = SamplingParams(**{**fields, "seeds": tuple(1000 + i for i in mine)})
            completions = engine.generate([prompts[i] for i in mine], params, cache=cache)
            result = {"hf": case["hf"], "layout": case["layout"], "params": fields, "cache": cache,
                      "completions": gathered(mine, completions), "forwards": engine.stats["forwards"]}
            if cache and fields is case["params"][-1]:  # one replay per case: the sampled, stopping one
                bare = [dataclasses.replace(c, logprobs=[], reveal_steps=[], generated_ids=[], generated_logprobs=[],
                                            generated_reveal_steps=[]) for c in completions]
                replayed, stats = replay(engine, bare, params)
                result["replayed"] = gathered(mine, replayed)
                result["replay_mismatched"] = stats.mismatched
            results.append(result)
        ps.destroy_model_parallel()
    finish(env, sys.argv[2], results)


def gathered(mine, completions) -> list[dict]:
    """Every replica's completions, in prompt order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    shares = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(shares, [(i, c.to_dict()) for i, c in zip(mine, completions)],
                           group=ps.get_data_parallel_group())
    return [c for _, c in sorted((pair for share in shares for pair in share), key=lambda pair: pair[0])]


if __name__ == "__main__":
    main()
