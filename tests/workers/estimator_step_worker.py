"""One RL step per estimator with rollouts on the Megatron backend, at one layout (under torchrun, or in process).

Spec: {"hf": dir, "layout": {...ParallelLayout fields}, "prompts": [[ids], ...], "out_dir": dir}. The replicas
decode their share of the prompts on the trainer's own shards (block KV cache, seeded sampling; request i
keeps seed 500 + i), with fixed advantages by global index; then for every built-in estimator, from those
weights and a fresh optimizer (two Monte-Carlo rows where it has that option), one policy update (Adam with eps=1, so that the weights follow the gradient,
not only its sign).
Rank 0 writes the step's loss, gradient norm, tokens and the updated weights (full HF tensors, torch.save) to
out_dir/<estimator>.pt and returns the list of estimators.
"""

import dataclasses
import json
import os
import sys

from _common import finish

ADVANTAGES = (1.0, -0.5, 0.75, -1.0, 0.25, -0.25)


def run_estimators(spec) -> list[str]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dare_mega.algorithms.estimators import ESTIMATORS, Sample, Totals, build
    from dare_mega.algorithms.policy import LossConfig
    from dare_mega.algorithms.rl import policy_update
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.parallel import ParallelLayout
    from dare_mega.rollout.megatron_engine import MegatronEngine
    from dare_mega.rollout.types import SamplingParams
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.metrics import reduce_sums
    from dare_mega.trainer.setup import build_optimizer
    from dare_mega.weight_sync.export import WeightExporter

    layout = ParallelLayout(**spec["layout"])
    prompts = spec["prompts"]
    replicas, replica = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    lo, hi = len(prompts) * replica // replicas, len(prompts) * (replica + 1) // replicas
    cfg = RLConfig()
    cfg.optim.lr, cfg.optim.eps = 0.5, 1.0
    names = [n for n in sorted(ESTIMATORS) if ESTIMATORS[n].__module__.startswith("dare_mega.")]
    chunks, args = build_from_hf(spec["hf"], layout)
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    runner = Runner(chunks, args)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, policy="low_confidence_static", steps=2,
                            stop_token_ids=(), seeds=tuple(500 + i for i in range(lo, hi)))
    completions = MegatronEngine(runner).generate(prompts[lo:hi], params, cache=True)
    samples = [Sample(c.prompt_ids, c.generated_ids, c.generated_reveal_steps, c.block_size, c.generated_logprobs,
                      ADVANTAGES[i % len(ADVANTAGES)]) for i, c in zip(range(lo, hi), completions)]
    device = next(chunks[0].parameters()).device
    totals = reduce_sums({"samples": len(samples), "tokens": sum(s.length for s in samples)},
                         ps.get_data_parallel_group(), device)
    initial = [p.detach().clone() for c in chunks for p in c.parameters()]

    def noise(epoch):
        return [torch.Generator().manual_seed(77 + lo + k) for k in range(len(samples))]

    for name in names:
        with torch.no_grad():  # every estimator starts from the weights that sampled
            for p, p0 in zip((p for c in chunks for p in c.parameters()), initial):
                p.copy_(p0)
        optimizer, _ = build_optimizer(cfg, chunks, torch.float32)
        fields = {f.name for f in dataclasses.fields(ESTIMATORS[name].Options)}
        estimator = build(name, args.diffusion.mask_token_id, **({"mc": 2} if "mc" in fields else {}))
        stats = policy_update(runner, optimizer, estimator, samples, noise, LossConfig(),
                              Totals(int(totals["samples"]), int(totals["tokens"])), 1,
                              sp_multiple=layout.tp if layout.sp else 1)
        loss = reduce_sums({"loss": stats["loss"]}, ps.get_data_parallel_group(), device)["loss"]
        weights = {}
        for bucket in WeightExporter(chunks, args, mapping_for(args)).buckets(receivers=0):
            weights.update({n: t.clone() for n, t in bucket.tensors})
        if dist.get_rank() == 0:
            torch.save({"loss": loss, "grad_norm": stats["grad_norm"], "tokens": int(totals["tokens"]),
                        "weights": weights}, os.path.join(spec["out_dir"], f"{name}.pt"))
    return names


def main():
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel

    spec = json.load(open(sys.argv[1]))
    env = init_distributed()
    init_model_parallel(ParallelLayout(**spec["layout"]), seed=0)
    finish(env, sys.argv[2], run_estimators(spec))


if __name__ == "__main__":
    main()
