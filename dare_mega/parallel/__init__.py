"""Process groups, parallel layouts, and the CPU compatibility layer for Megatron-Core."""

from dare_mega.parallel.distributed import DistEnv, destroy_distributed, init_distributed
from dare_mega.parallel.layout import ParallelLayout, init_model_parallel

__all__ = ["DistEnv", "ParallelLayout", "destroy_distributed", "init_distributed", "init_model_parallel"]
