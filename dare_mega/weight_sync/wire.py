"""What weight buckets look like on the wire to SGLang (sglang 0.5.23's contract).

- Flattened bucket: one 1-D uint8 tensor holding the bucket's tensors back to back, and per tensor a metadata
  record with attributes name, shape, dtype, start_idx, end_idx, numel (byte offsets, each aligned to its dtype's
  size, so that `flat[start:end].view(dtype).reshape(shape)` works). The server unpickles with an allowlist:
  the records are `types.SimpleNamespace` (allowlisted) unless sglang's own FlattenedTensorMetadata imports.
- Serialized payload: torch's ForkingPickler (CUDA tensors become CUDA-IPC handles) then standard base64, as
  sglang's MultiprocessingSerializer(output_str=True) does; CPU tensors (tests, CPU machines) go by value.
"""

from __future__ import annotations

import base64
import io
import pickle
import types

import torch


def _metadata(**fields):
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        return FlattenedTensorMetadata(**fields)
    except Exception:  # sglang absent (CPU machines) or not importable without its GPU stack
        return types.SimpleNamespace(**fields)


def flatten(named_tensors: list[tuple[str, torch.Tensor]], device=None) -> dict:
    """{"flattened_tensor": uint8 [n], "metadata": [...]}: tensors ordered by element size (largest first) so
    that every offset is aligned without padding; the receiver reads names from the metadata."""
    ordered = sorted(named_tensors, key=lambda item: -item[1].element_size())
    total = sum(t.numel() * t.element_size() for _, t in ordered)
    device = device or (ordered[0][1].device if ordered else "cpu")
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    metadata, start = [], 0
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        flat[start : start + nbytes].copy_(tensor.contiguous().view(-1).view(torch.uint8))
        metadata.append(_metadata(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype, start_idx=start,
                                  end_idx=start + nbytes, numel=nbytes))
        start += nbytes
    return {"flattened_tensor": flat, "metadata": metadata}


def unflatten(bucket: dict) -> list[tuple[str, torch.Tensor]]:
    flat = bucket["flattened_tensor"]
    out = []
    for m in bucket["metadata"]:
        if m.start_idx % torch.empty((), dtype=m.dtype).element_size():
            raise ValueError(f"{m.name}: offset {m.start_idx} is not aligned to {m.dtype}")
        out.append((m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)))
    return out


def serialize(obj) -> str:
    """ForkingPickler + base64 (sglang's MultiprocessingSerializer.serialize(obj, output_str=True))."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer

        return MultiprocessingSerializer.serialize(obj, output_str=True)
    except Exception:
        pass
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buffer = io.BytesIO()
    if any(t.device.type == "cuda" for t in _tensors(obj)):
        ForkingPickler(buffer).dump(obj)  # CUDA-IPC handles: the engine maps the trainer's GPU memory
    else:
        # CPU tensors by value: shared-memory files would need a torch_shm_manager daemon that outlives the
        # trainer and holds its output pipes open
        pickle.Pickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


# what sglang's SafeUnpickler lets through, besides builtins: the receiver in tests enforces the same rule
_REDUCTIONS = ("rebuild_tensor", "rebuild_storage_filename", "rebuild_storage_fd", "rebuild_cuda_tensor",
               "rebuild_typed_storage", "rebuild_typed_storage_child", "rebuild_storage_empty")
ALLOWED = {
    ("types", "SimpleNamespace"), ("collections", "OrderedDict"), ("multiprocessing.resource_sharer", "DupFd"),
    ("torch", "Size"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"),
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"),
    *(("torch.multiprocessing.reductions", name) for name in _REDUCTIONS),
}


class AllowlistUnpickler(pickle.Unpickler):
    """Refuses any global outside `ALLOWED`, torch dtypes and storage classes (as sglang's server does)."""

    def find_class(self, module, name):
        if (module, name) in ALLOWED or module == "builtins" and name in {"list", "dict", "tuple", "set", "getattr"}:
            return super().find_class(module, name)
        dtype_or_storage = isinstance(getattr(torch, name, None), torch.dtype) or name.endswith("Storage")
        if module in ("torch", "torch.storage") and dtype_or_storage:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"blocked unsafe global {module}.{name}")


def deserialize(data: str):
    import torch.multiprocessing  # noqa: F401

    return AllowlistUnpickler(io.BytesIO(base64.b64decode(data, validate=True))).load()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
