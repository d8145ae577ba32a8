"""The memory plan against the trainer's own tensors, per rank (under torchrun).

Cases: [{"hf": dir, "layout": {...ParallelLayout fields}, "dtype": "float32" | "bfloat16"}]. For each, every
rank builds the trainer as the SFT / RL trainers do (HF weights into shards, Megatron DDP, the distributed
optimizer), takes one optimizer step (Adam's moments exist from then on) and counts its tensors' storages:
the parameter buffers and module buffers, the gradient buffers, the optimizer state. Rank 0 writes, per case,
every rank's (measured, planned) bytes.
"""

import json
import sys

from _common import finish


def count(chunks, optimizer) -> dict:
    from dare_mega.trainer.offload import TrainerOffload

    buffers = [b for c in chunks for b in list(c.buffers) + list(c.expert_parallel_buffers)]
    params = {b.param_data.untyped_storage().data_ptr(): b.param_data.untyped_storage().nbytes() for b in buffers}
    module_buffers = sum(t.numel() * t.element_size() for c in chunks for _, t in c.named_buffers())
    grads = {b.grad_data.untyped_storage().data_ptr(): b.grad_data.untyped_storage().nbytes() for b in buffers}
    return {"parameters": sum(params.values()) + module_buffers, "gradients": sum(grads.values()),
            "optimizer_state": TrainerOffload(chunks, optimizer).device_bytes()["optimizer_state"]}


def main():
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.runner import wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout, init_distributed, init_model_parallel
    from dare_mega.trainer.config import SFTConfig
    from dare_mega.trainer.memory_plan import trainer_bytes
    from dare_mega.trainer.setup import build_optimizer

    env = init_distributed()
    results = []
    for case in json.load(open(sys.argv[1])):
        layout = ParallelLayout(**case["layout"])
        init_model_parallel(layout)
        dtype = getattr(torch, case["dtype"])
        chunks, args = build_from_hf(case["hf"], layout, RuntimeOptions(params_dtype=dtype))
        chunks = wrap_for_training(chunks, distributed_optimizer=True)
        optimizer, _ = build_optimizer(SFTConfig(), chunks, dtype)
        optimizer.zero_grad()
        optimizer.step()
        measured = count(chunks, optimizer)
        planned = dataclasses.asdict(trainer_bytes(
            args, mapping_for(args), layout, dtype, dist.get_world_size(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(), ps.get_expert_data_parallel_rank()))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {"rank": dist.get_rank(), "measured": measured, "planned": planned})
        results.append({**case, "ranks": everyone})
    finish(env, sys.argv[2], results)


if __name__ == "__main__":
    main()
