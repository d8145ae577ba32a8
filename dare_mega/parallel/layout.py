"""The parallel layout of one job (TP, PP, VPP, EP, ETP, SP) and its checks against the world and the model."""

from __future__ import annotations

from dataclasses import dataclass, field

from dare_mega.errors import ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    # expert tensor parallel; None: 1 when ep > 1 (what fine-grained MoE wants; slime and verl use it),
    # else tp (with ep == 1 Megatron reduces expert grads over the dense data-parallel group only)
    etp: int | None = None
    vpp: int | None = None  # virtual pipeline chunks per stage
    sequence_parallel: bool | None = None  # None: on whenever tp > 1
    moe_dispatcher: str = "alltoall"  # or "allgather"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", 1 if self.ep > 1 else self.tp)
        for key in ("tp", "pp", "ep", "etp"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel layout: {key}={value!r} must be a positive integer")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise ConfigError(f"parallel layout: vpp={self.vpp!r} must be a positive integer or None")
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel layout: vpp={self.vpp} needs pp > 1 (pp={self.pp})")
        if self.moe_dispatcher not in ("alltoall", "allgather"):
            raise ConfigError(
                f"parallel layout: moe_dispatcher={self.moe_dispatcher!r}; expected 'alltoall' or 'allgather'"
            )
        if self.ep == 1 and self.etp != self.tp:
            raise ConfigError(
                f"parallel layout: etp={self.etp} with ep=1 must equal tp={self.tp} (Megatron reduces expert "
                "gradients over the expert-data-parallel group only when ep > 1)"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel layout: sequence_parallel=True needs tp > 1")

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def num_chunks(self) -> int:
        return self.vpp or 1

    def check_world(self, world_size: int) -> None:
        """Raise a ConfigError naming the sizes when this layout cannot tile `world_size` processes."""
        dense = self.tp * self.pp
        if world_size % dense:
            raise ConfigError(
                f"parallel layout: tp*pp = {self.tp}*{self.pp} = {dense} does not divide the world size "
                f"{world_size}"
            )
        expert = self.etp * self.ep * self.pp
        if world_size % expert:
            raise ConfigError(
                f"parallel layout: etp*ep*pp = {self.etp}*{self.ep}*{self.pp} = {expert} does not divide the "
                f"world size {world_size}"
            )

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"EP={self.ep}"]
        if self.etp != (1 if self.ep > 1 else self.tp):
            parts.append(f"ETP={self.etp}")
        if self.vpp:
            parts.append(f"VPP={self.vpp}")
        if self.sp:
            parts.append("SP")
        return " x ".join(parts[:3]) + ("" if len(parts) == 3 else " (" + ", ".join(parts[3:]) + ")")


def init_model_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """Build Megatron-Core's process groups for `layout` over the initialised world and seed the RNG trackers."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    layout.check_world(world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
