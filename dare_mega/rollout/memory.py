"""What a native engine occupies, from shapes alone, and what a device has free: the numbers behind refusing an
engine that does not fit beside the trainer (trainer/backends.native_rollout).

Weights: every Megatron tensor of the mapping table at full size (the engine holds the whole model), in the
engine's dtype (rows that declare their own dtype, the router's expert bias, in theirs). KV cache: what the
decoder's `BlockKVCache` allocates for `rows` requests whose canvases reach `length` positions: keys and
values per layer, [rows + 1, kv_heads, length + block, head_dim] (a spare row and a block of room for padding).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass(frozen=True)
class EngineBytes:
    weights: int
    kv_cache: int
    rows: int
    length: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def engine_bytes(args, table, dtype: torch.dtype, rows: int, length: int) -> EngineBytes:
    from dare_mega.models.weight_mapping import dims_of

    dims = dims_of(args)
    weights = 0
    for binding in table.bindings():
        itemsize = torch.empty(0, dtype=binding.row.dtype or dtype).element_size()
        weights += sum(math.prod(spec.expected_shape(dims)) for spec in binding.row.hf) * itemsize
    per_position = 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()
    kv_cache = (rows + 1) * (length + args.diffusion.block_size) * per_position
    return EngineBytes(weights, kv_cache, rows, length)


def available_bytes(device: torch.device) -> int:
    """Free memory of a GPU (`torch.cuda.mem_get_info`), or the host's available memory (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_bytes("MemAvailable", "SC_AVPHYS_PAGES")


def host_bytes(field: str = "MemTotal", fallback: str = "SC_PHYS_PAGES") -> int:
    """A /proc/meminfo field in bytes (MemTotal: the host's memory), or sysconf's pages where it is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf(fallback) * os.sysconf("SC_PAGE_SIZE")


def gib(n: int) -> str:
    """Bytes for a message: GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.2f} MiB"
