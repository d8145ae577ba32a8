"""Megatron torch_dist checkpoints: streamed from HF safetensors, loaded at any layout, read tensor by tensor.

A torch_dist checkpoint (megatron.core.dist_checkpointing, PyTorch DCP files) stores every Megatron tensor
under a layout-free key with its GLOBAL shape: for dare_mega's models that global tensor is exactly the
"full Megatron tensor" of the family's mapping table (fc1 as [gate ; up], linear_qkv grouped per query
group, experts stacked on a leading axis, the vocabulary padded), so the table alone converts both ways.

- `save_from_hf`: each rank builds its model chunks on the meta device (no memory), lets Megatron describe
  the sharded state dict at the target layout, and hands it to Megatron's own `dist_checkpointing.save`
  with a strategy whose DCP planner materialises each written chunk only when the writer asks for it:
  read the HF tensors of that one Megatron tensor, convert, slice, write, drop. Peak memory: one tensor.
- `load_into`: Megatron's `dist_checkpointing.load` at the current layout (any TP/PP/EP/VPP/world size).
- `TorchDistReader`: reads one stored chunk (one expert, one tensor) at a time, without a model, for export.

Next to Megatron's files, the checkpoint holds `dare_mega.json` (the HF config, dtypes and names of the
source tensors, padded vocabulary) and `hf_assets/` (config, generation config, tokenizer files), so that
`mcore2hf` can write the HF checkpoint back byte-for-byte.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from dare_mega.errors import CheckpointError
from dare_mega.models import names

META_FILE = "dare_mega.json"
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1

DTYPES = {str(t).replace("torch.", ""): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------
# Keys: DCP key (+ chunk offset) <-> the mapping table's canonical Megatron name


def canonical_for_key(key: str, expert: int | None = None) -> str:
    """The table's Megatron name for a stored key; stacked expert keys need the expert index."""
    return names.from_stored_key(key, expert)


def key_for_canonical(name: str) -> tuple[str, int | None]:
    """(stored key, expert index or None) of a canonical Megatron name."""
    return names.stored_key(name)


# ----------------------------------------------------------------------------------------------------------
# Saving, streamed from HF


class _Materializer:
    """Produces any chunk of any stored tensor from the HF checkpoint, one full Megatron tensor at a time."""

    def __init__(self, table, reader, ctx, on_read=None):
        self.table, self.reader, self.ctx, self.on_read = table, reader, ctx, on_read
        self._cached: tuple[str, torch.Tensor] | None = None
        self.tensors_read = 0
        self.bytes_read = 0

    def full(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            binding = self.table.bind(name)
            hf = [self.reader.get(n) for n in binding.hf_names]
            nbytes = sum(t.numel() * t.element_size() for t in hf)
            self.tensors_read += len(hf)
            self.bytes_read += nbytes
            if self.on_read is not None:
                self.on_read(nbytes, len(hf))
            self._cached = (name, binding.row.to_megatron(hf, self.ctx))
        return self._cached[1]

    def chunk(self, key: str, offsets, sizes, dtype: torch.dtype) -> torch.Tensor:
        if names.is_stored_stack(key):
            expert, offsets, sizes = offsets[0], offsets[1:], sizes[1:]
            full = self.full(canonical_for_key(key, expert))[None]
            offsets, sizes = (0, *offsets), (1, *sizes)
        else:
            full = self.full(key)
        index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        piece = full[index]
        if tuple(piece.shape) != tuple(sizes):
            raise CheckpointError(f"{key}: chunk at {list(offsets)} of size {list(sizes)} does not fit {list(full.shape)}")
        return piece.to(dtype).contiguous()


def _streaming_strategy(materializer: _Materializer):
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        """Resolves each tensor chunk from the HF checkpoint at the moment the writer writes it."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            return materializer.chunk(write_item.index.fqn, list(chunk.offsets), list(chunk.sizes),
                                      write_item.tensor_data.properties.dtype)

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)

        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1)
            dcp_save(pyt_state_dict, storage_writer=writer,
                     planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return StreamingStrategy()


def model_sharded_state_dict(chunks) -> dict:
    """{'model': ...} (or model0, model1, ... with virtual pipeline stages), as Megatron's trainer nests it.

    Always one key per layer (`non_homogeneous_layers`): otherwise Megatron stacks the layers of a dense
    model on a leading axis and keys differ between families and between dense and MoE layers.
    """
    from dare_mega.models.hf_loader import unwrap

    metadata = {"non_homogeneous_layers": True}
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict(metadata=metadata)}
    return {f"model{i}": unwrap(c).sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def source_assets(hf_dir: str) -> list[str]:
    """Files of an HF checkpoint besides the weights: config, generation config, tokenizer, chat template."""
    skip = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")
    return sorted(f for f in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, f)) and not f.endswith(skip))


def tmp_sibling(directory: str) -> str:
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    return os.path.join(parent, f".{os.path.basename(os.path.abspath(directory))}.partial")


def check_output_dir(directory: str) -> None:
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise CheckpointError(f"{directory}: exists and is not empty; refusing to overwrite a checkpoint")


def save_from_hf(hf_dir: str, out_dir: str, layout, progress=None) -> dict:
    """Stream an HF checkpoint into a torch_dist checkpoint at `layout` (every rank calls it).

    Written to a hidden sibling directory and renamed into place when every rank has finished.
    `progress(nbytes, ntensors)` is called as HF tensors are read. Returns this rank's figures.
    """
    from megatron.core import dist_checkpointing

    from dare_mega.models.builder import build_model, load_model_args, mapping_for
    from dare_mega.models.hf_loader import check_hf_checkpoint
    from dare_mega.models.transformer_config import RuntimeOptions, check_layout, padded_vocab_size
    from dare_mega.models.weight_mapping import LayoutContext

    check_output_dir(out_dir)
    args = load_model_args(hf_dir)
    check_layout(args, layout, os.path.join(hf_dir, "config.json"))
    table = mapping_for(args)
    reader = check_hf_checkpoint(args, hf_dir, table)
    dtypes = {name: dtype_name(reader.dtype(name)) for name in reader.names()}
    params_dtype = DTYPES[_dominant(dtypes)]
    with torch.device("meta"):
        chunks = build_model(args, layout, RuntimeOptions(params_dtype=params_dtype, init_weights=False), hf_dir)
    padded = padded_vocab_size(args.vocab_size, layout.tp)
    materializer = _Materializer(table, reader, LayoutContext.of(args, padded_vocab=padded), on_read=progress)

    tmp = tmp_sibling(out_dir)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    # spread the writing (and so the reading of HF tensors) over the data-parallel replicas
    strategy = FullyParallelSaveStrategyWrapper(
        _streaming_strategy(materializer), parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    dist_checkpointing.save(model_sharded_state_dict(chunks), tmp, sharded_strategy=strategy)
    if rank == 0:
        cfg_path = os.path.join(hf_dir, "config.json")
        with open(cfg_path) as f:
            hf_config = json.load(f)
        meta = {
            "format": FORMAT_VERSION,
            "architecture": args.architecture,
            "hf_config": hf_config,
            "hf_tensors": {name: {"dtype": dtypes[name], "shape": list(reader.shapes[name])} for name in reader.names()},
            "hf_tensor_order": reader.names(),
            "padded_vocab_size": padded,
            "params_dtype": dtype_name(params_dtype),
            "saved_layout": layout.describe(),
        }
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        os.makedirs(os.path.join(tmp, ASSETS_DIR))
        for name in source_assets(hf_dir):
            shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, ASSETS_DIR, name))
    dist.barrier()
    if rank == 0:
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier()
    return {"tensors_read": materializer.tensors_read, "bytes_read": materializer.bytes_read}


def _dominant(dtypes: dict[str, str]) -> str:
    """The dtype most tensors have (the expert bias stays fp32 whatever the rest is)."""
    counts: dict[str, int] = {}
    for d in dtypes.values():
        counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.get)


# ----------------------------------------------------------------------------------------------------------
# Loading at any layout


def read_meta(mcore_dir: str) -> dict:
    path = os.path.join(mcore_dir, META_FILE)
    if not os.path.isdir(mcore_dir):
        raise CheckpointError(f"{mcore_dir}: checkpoint directory does not exist")
    for required in (".metadata", "metadata.json", META_FILE):
        if not os.path.exists(os.path.join(mcore_dir, required)):
            raise CheckpointError(
                f"{mcore_dir}: {required} is missing: not a complete dare_mega torch_dist checkpoint "
                "(an interrupted conversion leaves only a hidden .partial directory)"
            )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this dare_mega reads {FORMAT_VERSION}")
    return meta


def args_of(mcore_dir: str):
    """The model's args, read as from the source HF checkpoint (its config.json and generation config)."""
    from dare_mega.models.builder import load_model_args

    read_meta(mcore_dir)
    return load_model_args(os.path.join(mcore_dir, ASSETS_DIR))


def load_into(chunks, mcore_dir: str) -> None:
    """Load a torch_dist checkpoint into this rank's chunks (any layout; every rank calls it)."""
    from megatron.core import dist_checkpointing

    from dare_mega.models.hf_loader import unwrap

    meta = read_meta(mcore_dir)
    padded = unwrap(chunks[0]).vocab_size
    if padded != meta["padded_vocab_size"]:
        raise CheckpointError(
            f"{mcore_dir}: saved with a padded vocabulary of {meta['padded_vocab_size']}, the model has {padded} "
            "(tensor parallel sizes above 8 pad further; convert again at this layout)"
        )
    template = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(template, mcore_dir)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)


# ----------------------------------------------------------------------------------------------------------
# Reading stored tensors without a model (export)


class TorchDistReader:
    """Reads whole stored tensors, or one expert of a stacked one, from a torch_dist checkpoint."""

    def __init__(self, mcore_dir: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = mcore_dir
        self.meta = read_meta(mcore_dir)
        self._reader = FileSystemReader(mcore_dir)
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def global_shape(self, key: str) -> tuple[int, ...]:
        if key not in self.metadata.state_dict_metadata:
            raise CheckpointError(f"{self.dir}: tensor {key!r} is not in the checkpoint")
        return tuple(self.metadata.state_dict_metadata[key].size)

    def read(self, key: str, expert: int | None = None) -> torch.Tensor:
        """The stored tensor `key` (for stacked experts: expert `expert`'s slice, without the expert axis)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        shape = self.global_shape(key)
        entry = self.metadata.state_dict_metadata[key]
        offsets = [0] * len(shape)
        sizes = list(shape)
        if expert is not None:
            offsets[0], sizes[0] = expert, 1
        out = torch.empty(sizes, dtype=entry.properties.dtype)
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, entry, [wanted])
        planner = _ChunkPlanner(out)
        plan = self._reader.prepare_local_plan(LoadPlan(items))
        self._reader.read_data(plan, planner).wait()
        return out[0] if expert is not None else out


class _ChunkPlanner:
    """The small part of DCP's LoadPlanner protocol FileSystemReader.read_data uses: copy into one buffer."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, read_item):
        index = tuple(slice(o, o + s) for o, s in zip(read_item.dest_offsets, read_item.lengths))
        return self.out[index]

    def commit_tensor(self, read_item, tensor):
        index = tuple(slice(o, o + s) for o, s in zip(read_item.dest_offsets, read_item.lengths))
        if self.out[index].data_ptr() != tensor.data_ptr():
            self.out[index].copy_(tensor)

    def load_bytes(self, read_item, value):
        raise CheckpointError(f"unexpected bytes item {read_item.dest_index.fqn} while reading tensors")
