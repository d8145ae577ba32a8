"""HF safetensors weights straight into this rank's Megatron shards, driven by the family's mapping table.

`check_hf_checkpoint` compares the checkpoint's headers with what the config implies (every tensor present,
every shape right, nothing left over) before any model is built; `load_hf_weights` then reads, for each
tensor this rank holds, only the HF tensors it is made of, converts the layout and copies in its shard.
"""

from __future__ import annotations

import os

import torch

from dare_mega.errors import CheckpointError
from dare_mega.models import names
from dare_mega.models.args import ModelArgs
from dare_mega.models.weight_mapping import Binding, LayoutContext, MappingTable
from dare_mega.storage.safetensors_io import CheckpointReader


def check_hf_checkpoint(args: ModelArgs, directory: str, table: MappingTable) -> CheckpointReader:
    reader = CheckpointReader(directory)
    expected = table.expected_hf()
    missing = [name for name in expected if name not in reader]
    if missing:
        shown = ", ".join(f"{n} {list(expected[n])}" for n in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) that the {args.architecture} config needs are missing: "
            f"{shown}{more}"
        )
    shapes = reader.shapes
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise CheckpointError(
                f"{reader.file_of(name)}: tensor {name!r} has shape {list(shapes[name])}, but the config "
                f"({args.architecture}) needs {list(shape)}"
            )
    unexpected = sorted(set(reader.names()) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensor(s) are not part of the {args.architecture} layout the "
            f"config describes (wrong config, or layers/experts the config does not count): "
            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    return reader


def unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def global_name(model, local_name: str) -> str:
    """A parameter name of one chunk with global layer and expert indices, in the canonical expert form."""
    name = names.canonical(local_name)
    local_layer = names.layer_of(name)
    if local_layer is None:
        return name
    layer = model.decoder.layers[local_layer]
    _, local_expert = names.split_expert(name)
    expert = None if local_expert is None else layer.mlp.local_expert_indices[local_expert]
    return names.with_indices(name, layer.layer_number - 1, expert)


def megatron_tensors(model, table: MappingTable):
    """(global name, binding, tensor) for every parameter and mapped buffer of one model chunk."""
    model = unwrap(model)
    buffers = {name for name, _ in model.named_buffers()}
    for local, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        name = global_name(model, local)
        try:
            binding = table.bind(name)
        except KeyError:
            if local in buffers:
                continue  # rotary tables and other derived buffers
            raise
        yield name, binding, tensor


def shard_group(binding: Binding) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if binding.row.expert:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def load_hf_weights(chunks, args: ModelArgs, directory: str, table: MappingTable,
                    reader: CheckpointReader | None = None) -> int:
    """Copy HF weights into every tensor of this rank's chunks; returns the number of tensors loaded."""
    reader = reader or check_hf_checkpoint(args, directory, table)
    import torch.distributed as dist
    from tqdm import tqdm

    work = []
    for chunk in chunks:
        model = unwrap(chunk)
        ctx = LayoutContext.of(args, padded_vocab=model.vocab_size)
        work += [(ctx, item) for item in megatron_tensors(model, table)]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    loaded = 0
    with tqdm(total=len(work), desc=f"loading {os.path.basename(os.path.normpath(directory))}", unit="tensor",
              disable=not rank0 or len(work) < 200) as progress:
        for ctx, (name, binding, tensor) in work:
            hf = [reader.get(n) for n in binding.hf_names]
            full = binding.row.to_megatron(hf, ctx)
            rank, size = shard_group(binding)
            shard = binding.row.shard(full, rank, size)
            if tuple(shard.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{directory}: {', '.join(binding.hf_names)} give {name} a shard of shape "
                    f"{list(shard.shape)} but the model holds {list(tensor.shape)}"
                )
            with torch.no_grad():
                tensor.copy_(shard)  # casts to the tensor's dtype (an fp32 buffer stays fp32)
            loaded += 1
            progress.update()
    return loaded
