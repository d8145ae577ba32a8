"""What weight buckets look like on the wire to SGLang (sglang 0.5.23's contract; tests/test_sglang.py decodes
them with SGLang's own code).

- Flattened bucket: one 1-D uint8 tensor holding the bucket's tensors back to back, and per tensor a metadata
  record with attributes name, shape, dtype, start_idx, end_idx, numel (byte offsets, each aligned to its dtype's
  size, so that `flat[start:end].view(dtype).reshape(shape)` works: SGLang's `FlattenedTensorBucket` layout, also
  what its `FlattenedTensorBucket.empty` allocates for the distributed route given the names in this order). The
  records are `types.SimpleNamespace`, which SGLang's restricted unpickler allows; its receiver rebuilds its own
  metadata class from the attributes. Nothing here imports sglang: the trainer does not need it installed.
- Serialized payload: torch's ForkingPickler then standard base64, as sglang's
  MultiprocessingSerializer(output_str=True) does. CUDA tensors become CUDA-IPC handles whose device is the GPU's
  UUID, not its index (what SGLang's patched reductions produce, sglang/srt/utils/patch_torch.py): the receiver
  maps the UUID to its own device numbering, so the handle opens on the right GPU under per-process
  CUDA_VISIBLE_DEVICES, Ray, or a server on a subset of the GPUs. CPU tensors (tests, CPU machines) go by value.
"""

from __future__ import annotations

import base64
import io
import pickle
import types

import torch

# the device argument of torch's CUDA tensor reduction (torch/multiprocessing/reductions.py, reduce_tensor:
# rebuild_cuda_tensor's arguments are tensor class, size, stride, offset, storage class, dtype, DEVICE, handle, ...)
CUDA_DEVICE_ARG = 6


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
        metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype, start_idx=start,
                                  end_idx=start + nbytes, numel=nbytes))
        start += nbytes
    return {"flattened_tensor": flat, "metadata": metadata}


def serialize(obj) -> str:
    """ForkingPickler + base64 (sglang's MultiprocessingSerializer.serialize(obj, output_str=True)), CUDA devices
    named by UUID."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buffer = io.BytesIO()
    if any(t.device.type == "cuda" for t in _tensors(obj)):
        pickler = ForkingPickler(buffer)
        from torch.multiprocessing import reductions

        for cls, reduce in list(pickler.dispatch_table.items()):
            if reduce is reductions.reduce_tensor:
                pickler.dispatch_table[cls] = reduce_with_device_uuid
        pickler.dump(obj)  # CUDA-IPC handles: the engine maps the trainer's GPU memory
    else:
        # CPU tensors by value: shared-memory files would need a torch_shm_manager daemon that outlives the
        # trainer and holds its output pipes open
        pickle.Pickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def reduce_with_device_uuid(tensor: torch.Tensor):
    """torch's reduction of a tensor, with a CUDA tensor's device index replaced by that GPU's UUID."""
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if rebuild is reductions.rebuild_cuda_tensor and isinstance(args[CUDA_DEVICE_ARG], int):
        uuid = str(torch.cuda.get_device_properties(args[CUDA_DEVICE_ARG]).uuid)
        args = (*args[:CUDA_DEVICE_ARG], uuid, *args[CUDA_DEVICE_ARG + 1 :])
    return rebuild, args


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
