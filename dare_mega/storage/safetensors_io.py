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
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
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
        self._headers: dict[str, tuple[int, dict]] = {}

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

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, from the header."""
        code = self._handle(self.weight_map[name]).get_slice(name).get_dtype()
        return SAFETENSORS_DTYPES[code]

    def _layout(self, file: str) -> tuple[int, dict]:
        """(data start, header) of one file, read once; safe_open has already validated the file."""
        if file not in self._headers:
            self._handle(file)
            with open(os.path.join(self.directory, file), "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[file] = (8 + size, json.loads(f.read(size)))
        return self._headers[file]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into fresh memory (not memory-mapped: the process keeps only what it holds)."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing")
        file = self.weight_map[name]
        start, header = self._layout(file)
        entry = header[name]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(os.path.join(self.directory, file), "rb", buffering=0) as f:
            f.seek(start + begin)
            view = memoryview(buffer.numpy())
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{os.path.join(self.directory, file)}: ends inside tensor {name!r}")
                done += n
        return buffer.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self):
        self._handles.clear()
        self._headers.clear()


SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class StreamingSafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is known up
    front, so the data streams in declared order and is never all in memory at once."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = path
        self.entries = entries
        header = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self.entries[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path}: expected {expected_name} {dtype} {list(shape)} next, got {name} {tensor.dtype} "
                f"{list(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._file.write(data)
        self._next += 1
        self.bytes_written += len(data)

    def close(self) -> None:
        if self._next != len(self.entries):
            raise CheckpointError(f"{self.path}: {len(self.entries) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _nbytes(dtype: torch.dtype, shape) -> int:
    count = 1
    for d in shape:
        count *= d
    return count * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list]:
    """Split (name, dtype, shape) entries, in order, into files of at most max_shard_bytes (one tensor may
    exceed it alone)."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: str, shards: list[list], names: list[str]) -> None:
    """model.safetensors.index.json for several shard files (nothing for a single file)."""
    if len(shards) == 1:
        return
    weight_map = {entry[0]: file for shard, file in zip(shards, names) for entry in shard}
    total = sum(_nbytes(entry[1], entry[2]) for shard in shards for entry in shard)
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class LazyTensors:
    """(name, dtype, shape) entries and a function producing each tensor when it is written."""

    def __init__(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], produce):
        self.entries, self.produce = entries, produce


def write_hf_checkpoint(
    directory: str,
    tensors,
    config: dict | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write safetensors shards (with an index when more than one), config.json and extra files.

    `tensors` is a dict of tensors, or a LazyTensors (entries known up front, each tensor produced when it
    is written), so that a checkpoint larger than memory can be written. Everything goes to a temporary
    sibling directory first and is renamed into place when complete: a reader never sees a half-written one.
    """
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and os.listdir(directory):
        raise CheckpointError(f"{directory}: exists and is not empty; refusing to overwrite a checkpoint")
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(tmp)
    if isinstance(tensors, LazyTensors):
        entries, produce = tensors.entries, tensors.produce
    else:
        entries, produce = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], tensors.__getitem__
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(len(shards))
    for shard, file in zip(shards, names):
        writer = StreamingSafetensorsWriter(os.path.join(tmp, file), shard)
        for name, _, _ in shard:
            writer.write(name, produce(name))
        writer.close()
    write_index(tmp, shards, names)
    if config is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    for name, data in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    if os.path.exists(directory):
        os.rmdir(directory)
    os.replace(tmp, directory)
