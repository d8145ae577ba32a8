"""Streaming access to HF safetensors checkpoints (single file or sharded with an index).

Reading is lazy: headers give names, shapes and dtypes without touching the data; a tensor is read (memory
mapped) only when asked for, so a rank holds only what it loads.
"""

from __future__ import annotations

import json
import os
from functools import cached_property

import torch
from safetensors import safe_open

from dare_mega.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: checkpoint directory does not exist")
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            self.weight_map = dict(weight_map)
            missing = sorted({f for f in self.weight_map.values() if not os.path.exists(os.path.join(directory, f))})
            if missing:
                raise CheckpointError(
                    f"{index}: lists shard files that are not in {directory}: {', '.join(missing)} "
                    "(incomplete download or half-written checkpoint)"
                )
        elif os.path.exists(single):
            with safe_open(single, "pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is present")
        self._handles: dict[str, object] = {}

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self.weight_map[name])

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(os.path.join(self.directory, file), "pt")
            except Exception as e:  # safetensors raises its own error type for truncated files
                raise CheckpointError(f"{os.path.join(self.directory, file)}: cannot be read ({e})") from e
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, file in self.weight_map.items():
            handle = self._handle(file)
            try:
                out[name] = tuple(handle.get_slice(name).get_shape())
            except Exception as e:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} listed in the index is absent ({e})") from e
        return out

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def close(self):
        self._handles.clear()


def write_hf_checkpoint(
    directory: str,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write safetensors shards (with an index when more than one), config.json and extra files.

    Everything goes to a temporary sibling directory first and is renamed into place when complete, so a
    reader never sees a half-written checkpoint.
    """
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and os.listdir(directory):
        raise CheckpointError(f"{directory}: exists and is not empty; refusing to overwrite a checkpoint")
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(tmp)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.contiguous()
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    if config is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    for name, data in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    if os.path.exists(directory):
        os.rmdir(directory)
    os.replace(tmp, directory)
