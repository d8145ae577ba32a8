"""Which experts each token was routed to, in the Megatron model and in the rollout engine, and how often they differ.

RL on MoE models suffers when the rollout engine and the trainer pick different experts for the same token
(different kernels, reduction orders, dtypes): the trainer then optimises a policy that did not sample. The
trainer records Megatron's routing of the first log-prob forward of a step (the weights that sampled) with
forward hooks on the routers, the engine routes the same rows with its own forward, and the logged
`router_mismatch` is the fraction of (token, MoE layer) pairs whose top-k expert sets differ.

Routing replay (R3, as slime and verl do for autoregressive MoE RL): with `algorithm.routing_replay=rollout`
the trainer's forwards use, token by token, the experts the rollout engine chose for the same rows, through
Megatron-Core's own RouterReplay (`moe_enable_routing_replay`): `replay_routing` hands each router of a model
chunk its targets for one micro-batch (its pipeline stage's layers, its sequence-parallel slice) and clears
them after the forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def record_megatron_routing(chunks):
    """Yields {global layer (0-based): [routing_map [s_local, micro_batch, experts] bool per micro-batch, in order]}.

    Under sequence parallelism each rank's routers see its slice of the sequence (rank t: the t-th 1/tp)."""
    from megatron.core.transformer.moe.router import TopKRouter

    record: dict[int, list[torch.Tensor]] = {}
    handles = []

    def hook(module, inputs, output):
        hidden = inputs[0]
        routing_map = output[1]
        record.setdefault(module.layer_number - 1, []).append(
            routing_map.detach().view(hidden.shape[0], hidden.shape[1], -1).cpu())

    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                handles.append(module.register_forward_hook(hook))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def mismatch_counts(megatron_record: dict[int, list[torch.Tensor]], engine_experts: dict[int, torch.Tensor],
                    counted: torch.Tensor, micro_batch_size: int) -> tuple[int, int]:
    """(differing, total) (token, layer) pairs among the positions `counted` [B, S] bool, on this rank.

    engine_experts[layer]: [B, S, topk] expert ids for the whole batch; megatron_record as recorded above
    (this rank's sequence slice, found from the slice length and the tensor-parallel rank)."""
    from megatron.core import parallel_state as ps

    differ = total = 0
    for layer, maps in megatron_record.items():
        chosen = engine_experts[layer]
        for m, routing_map in enumerate(maps):
            s_local, mb, experts = routing_map.shape
            start = ps.get_tensor_model_parallel_rank() * s_local if s_local < chosen.shape[1] else 0
            rows = slice(m * micro_batch_size, m * micro_batch_size + mb)
            engine_map = torch.zeros(mb, chosen.shape[1], experts, dtype=torch.bool)
            engine_map.scatter_(2, chosen[rows], True)
            engine_map = engine_map[:, start : start + s_local]  # [mb, s_local, E]
            keep = counted[rows, start : start + s_local]
            different = (engine_map != routing_map.transpose(0, 1)).any(-1)
            differ += int((different & keep).sum())
            total += int(keep.sum())
    return differ, total


@contextmanager
def replay_routing(chunk, experts: dict | None, sequence_parallel: bool):
    """Within the block, every MoE router of `chunk` routes as `experts` says: {global layer: [mb, S, topk]}
    for this micro-batch (the whole sequence; under sequence parallelism each rank takes its slice). Nothing
    happens when `experts` is None. Refuses a model built without routing replay, or a layer with no targets."""
    if experts is None:
        yield
        return
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from dare_mega.errors import ConfigError

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    routers = [m for m in chunk.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        layer = router.layer_number - 1
        if router.router_replay is None:
            raise ConfigError("routing replay needs the model built with RuntimeOptions(routing_replay=True)")
        if layer not in experts:
            raise ConfigError(f"routing replay: no expert choices for MoE layer {layer} (given: {sorted(experts)})")
        chosen = experts[layer]
        if sequence_parallel and tp > 1:
            local = chosen.shape[1] // tp
            chosen = chosen[:, rank * local : (rank + 1) * local]
        # the router sees hidden states [s, b, h] flattened s-major: token (s, b) is row s * b_size + b
        router.router_replay.set_target_indices(chosen.transpose(0, 1).reshape(-1, chosen.shape[-1]).long())
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for router in routers:
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()
