"""The RL loop's rollout -> score -> dynamic_sampling phases (trainer/rl_phases.py) with a scripted engine, on
every data-parallel rank of a world (torchrun; Megatron's groups at TP = PP = 1, so dp = world size).

Spec: a list of cases {"overrides": [...RLConfig overrides], "steps": [1, 2, ...], "prompts": count}. Prompt i's completions
are right (reward 1) when i % 3 == 0, wrong when i % 3 == 1, and right on odd seeds when i % 3 == 2, so only
those groups have reward variance; "hard": true makes every prompt of kind 0 or 1. The engine is lockstep
(every rank must call it as often). Rank 0 writes, per step, every rank's kept (prompt, seed, reward) in rank
order, each rank's `first`, its generate calls, and the filter's statistics (a list per case).
"""

import json
import sys
from types import SimpleNamespace

from _common import finish


class ScriptedEngine:
    lockstep = True

    def __init__(self, hard: bool):
        self.hard, self.calls = hard, 0

    def generate(self, prompts, params, cache=True):
        from dare_mega.rollout.types import Completion

        self.calls += 1
        out = []
        for prompt, seed in zip(prompts, params.seeds):
            i = int(prompt[1:])
            kind = i % 2 if self.hard else i % 3
            right = kind == 0 or (kind == 2 and seed % 2 == 1)
            out.append(Completion([i], [7], "1" if right else "0", "stop", [0.0], [0], [7], [0.0], [0], 4, 1,
                                  extra={"seed": seed}))
        return out


def run_case(spec, env) -> list[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dare_mega.config import load_config
    from dare_mega.trainer import rl_phases as phase
    from dare_mega.trainer.config import RLConfig

    cfg = load_config(RLConfig, None, spec["overrides"])
    records = [{"prompt": f"q{i}", "answer": "1", "_reward": "arithmetic"} for i in range(spec["prompts"])]
    engine = ScriptedEngine(spec.get("hard", False))
    job = SimpleNamespace(cfg=cfg, inputs=SimpleNamespace(train=records), engine=engine,
                          args=SimpleNamespace(diffusion=SimpleNamespace(attention="block_diffusion")),
                          dp_rank=ps.get_data_parallel_rank(), dp_group=ps.get_data_parallel_group(),
                          env=SimpleNamespace(device=torch.device("cpu"), is_main=env.is_main))
    steps = []
    for step in spec["steps"]:
        engine.calls = 0
        rollout = phase.rollout(job, step)
        scored = phase.score(job, rollout)
        stats = {}
        if cfg.rollout.filter != "none":
            rollout, scored, stats = phase.dynamic_sampling(job, rollout, scored)
        mine = {"kept": [[c.prompt_ids[0], c.extra["seed"], float(v)]
                         for c, v in zip(rollout.completions, scored.rewards)],
                "first": rollout.first, "calls": engine.calls, "stats": stats,
                "requests": [r["prompt"] for r in rollout.requests]}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        steps.append({"step": step, "ranks": everyone})
    return steps


def main():
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel

    env = init_distributed()
    init_model_parallel(ParallelLayout())
    results = []
    for spec in json.load(open(sys.argv[1])):
        results.append(run_case(spec, env))
    finish(env, sys.argv[2], results)


if __name__ == "__main__":
    main()
