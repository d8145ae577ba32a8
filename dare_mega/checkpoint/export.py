"""torch_dist -> HF safetensors, streamed: one stored tensor in memory at a time, shards of at most 5 GB.

The output has the source checkpoint's tensor names, dtypes and shapes (recorded in the torch_dist
checkpoint's dare_mega.json), no Megatron padding, an index when there is more than one file, and the
source's config.json, generation config and tokenizer files (hf_assets/). Ranks split the shard files
between them; everything goes to a hidden sibling directory renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from dare_mega.checkpoint.torch_dist import (
    ASSETS_DIR,
    DTYPES,
    TorchDistReader,
    check_output_dir,
    key_for_canonical,
    read_meta,
    tmp_sibling,
)
from dare_mega.errors import CheckpointError
from dare_mega.storage.safetensors_io import (
    StreamingSafetensorsWriter,
    plan_shards,
    shard_file_names,
    write_index,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


def export_to_hf(mcore_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress=None) -> dict:
    """Write the HF checkpoint of a torch_dist checkpoint (every rank calls it; works at any world size).

    `progress(nbytes, ntensors)` is called as tensors are written. Returns this rank's figures.
    """
    from dare_mega.checkpoint.torch_dist import args_of
    from dare_mega.models.builder import mapping_for
    from dare_mega.models.weight_mapping import LayoutContext

    check_output_dir(out_dir)
    meta = read_meta(mcore_dir)
    args = args_of(mcore_dir)
    table = mapping_for(args)
    reader = TorchDistReader(mcore_dir)
    ctx = LayoutContext.of(args, padded_vocab=meta["padded_vocab_size"])
    recorded = meta["hf_tensors"]
    bindings = list(table.bindings())
    produced = [name for b in bindings for name in b.hf_names]
    if set(produced) != set(recorded):
        missing, extra = sorted(set(recorded) - set(produced)), sorted(set(produced) - set(recorded))
        raise CheckpointError(
            f"{mcore_dir}: the mapping table of {args.architecture} does not produce the recorded source tensors "
            f"(not produced: {missing[:3]}, unexpected: {extra[:3]})"
        )
    # binding order keeps each stored tensor's HF outputs together: every stored tensor is read once
    entries = [(name, DTYPES[recorded[name]["dtype"]], tuple(recorded[name]["shape"])) for name in produced]
    shards = plan_shards(entries, max_shard_bytes)
    files = shard_file_names(len(shards))
    owner = {name: b for b in bindings for name in b.hf_names}

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tmp = tmp_sibling(out_dir)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    stats = {"tensors_written": 0, "bytes_written": 0}
    for i, (shard, file) in enumerate(zip(shards, files)):
        if i % world != rank:
            continue
        writer = StreamingSafetensorsWriter(os.path.join(tmp, file), shard)
        pending: dict[str, torch.Tensor] = {}
        for name, dtype, shape in shard:
            if name not in pending:
                binding = owner[name]
                key, expert = key_for_canonical(binding.megatron_name)
                full = reader.read(key, expert)
                pending.update(zip(binding.hf_names, binding.row.to_hf(full, ctx)))
            tensor = pending.pop(name).to(dtype)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{mcore_dir}: {name} comes out {list(tensor.shape)}, the source had {list(shape)}")
            writer.write(name, tensor)
            stats["tensors_written"] += 1
            stats["bytes_written"] += tensor.numel() * tensor.element_size()
            if progress is not None:
                progress(tensor.numel() * tensor.element_size(), 1)
        writer.close()
    if rank == 0:
        write_index(tmp, shards, files)
        assets = os.path.join(mcore_dir, ASSETS_DIR)
        for name in sorted(os.listdir(assets)):
            shutil.copy2(os.path.join(assets, name), os.path.join(tmp, name))
    if world > 1:
        dist.barrier()
    if rank == 0:
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    if world > 1:
        dist.barrier()
    return stats
