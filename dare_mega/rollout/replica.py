"""One engine per data-parallel replica, not per rank (rollout.backend=native or sglang at TP / PP > 1).

The tensor and pipeline ranks of a replica decode the same requests with the same seeds, so only the
replica's first model-parallel rank (the leader) holds an engine and decodes; the others receive its
completions, and its expert choices for the routing check and replay, by broadcast in the model-parallel
group. So every rank of a replica trains on the same completions even where the engine is not bitwise
deterministic (an SGLang server batches each request differently), and a server gets each request once.
Weight sync reaches every rank (transports.InProcessTransport); the followers only move their version.
"""

from __future__ import annotations

import torch.distributed as dist


class ReplicaEngine:
    """generate / routed_experts / load_weights / weight_version of `engine` on the leader (`engine` is None on
    the other ranks of `group`)."""

    def __init__(self, engine, group, leader: int, routes: bool = True):
        """`routes`: whether the engine reports its expert choices (routed_experts); the same on every rank."""
        self.engine, self.group, self.leader, self.routes = engine, group, leader, routes
        self._version = 0

    @classmethod
    def built_on_leader(cls, build, group, leader: int, shared=()):
        """`build()` on the leader only; an error there is raised on every rank of the group (none is left
        waiting in a collective). `shared`: attributes of the engine every rank gets (e.g. "algorithm")."""
        engine, box = None, [None]
        if dist.get_rank() == leader:
            try:
                engine = build()
                box[0] = ("ok", {"routes": hasattr(engine, "routed_experts"),
                                 **{name: getattr(engine, name) for name in shared}})
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                box[0] = ("error", error)
        dist.broadcast_object_list(box, src=leader, group=group)
        kind, value = box[0]
        if kind == "error":
            raise value
        replica = cls(engine, group, leader, value.pop("routes"))
        for name, attribute in value.items():
            setattr(replica, name, attribute)
        return replica

    @property
    def is_leader(self) -> bool:
        return self.engine is not None

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version if self.is_leader else self._version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        if self.is_leader:
            self.engine.weight_version = version
        self._version = version

    @property
    def stats(self) -> dict:
        """The leader's decoding counters (empty on the other ranks: reading them is not a collective)."""
        return dict(self.engine.stats) if self.is_leader else {}

    def generate(self, prompts, params=None, cache: bool = True):
        return self._share(lambda: self.engine.generate(prompts, params, cache=cache))

    def routed_experts(self, input_ids, position_ids, mask, chunk: int = 8):
        if not self.routes:
            raise AttributeError(f"{type(self.engine).__name__} does not report its expert choices")
        return self._share(lambda: self.engine.routed_experts(input_ids, position_ids, mask, chunk))

    def load_weights(self, named_tensors, version: int | None = None) -> int:
        if self.is_leader:
            return self.engine.load_weights(named_tensors, version)
        if version is not None:
            self._version = version
        return 0

    def _share(self, compute):
        """The leader computes; every rank of the group returns the leader's result (an error there is raised
        on every rank, so none waits forever in a collective)."""
        box = [None]
        if self.is_leader:
            try:
                box[0] = ("ok", compute())
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                box[0] = ("error", error)
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value
