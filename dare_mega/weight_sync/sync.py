"""One weight sync: export buckets from the trainer's shards and push them through a transport, all or nothing.

Every rank calls `WeightSync.sync(version)`. An attempt that fails anywhere (an engine that refuses a bucket,
dies, or reports the wrong version) is noticed by every rank (one all-reduce at the end of the attempt; a
failing rank keeps taking part in the exporter's collectives until then, so nobody blocks), the engines' update
sessions are closed, and the whole sync starts again from the first bucket. The version rides only on the
last bucket, so an engine never reports a version whose weights it did not fully receive.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from dare_mega.errors import DareMegaError
from dare_mega.weight_sync.export import WeightExporter
from dare_mega.weight_sync.transports import Transport


class WeightSyncError(DareMegaError):
    pass


class WeightSync:
    def __init__(self, exporter: WeightExporter, transport: Transport, retries: int = 2, check=None):
        """`check`, optional (SGLangWeightCheck): wraps the first sync; its engine calls run on the ranks that
        talk to the engines, and a mismatch stops every rank."""
        self.exporter, self.transport, self.retries, self.check = exporter, transport, retries, check
        self.synced = False

    def sync(self, version: int) -> dict:
        clock = time.perf_counter()
        first, self.synced = not self.synced, True
        if first and self.check is not None:
            attempt = self._sync(version) if self.check.resync else 1
            self._on_engines(self.check.before, version)
            attempt = max(attempt, self._sync(version))  # the most attempts any of the syncs took
            self._on_engines(self.check.after, version)
        else:
            attempt = self._sync(version)
        seconds = time.perf_counter() - clock
        nbytes = self.exporter.plan.total_bytes
        return {"version": version, "attempts": attempt, "seconds": seconds, "bytes": nbytes,
                "buckets": len(self.exporter.plan.buckets), "gb_per_s": nbytes / max(seconds, 1e-9) / 1e9}

    def _sync(self, version: int) -> int:
        for attempt in range(1, self.retries + 2):
            error = self._attempt(version)
            if not _any_rank(error is not None):
                return attempt
            self.transport.abort()
            if error is not None:
                print(f"weight sync to version {version}: attempt {attempt} failed: {error}", file=sys.stderr,
                      flush=True)
        raise WeightSyncError(f"weight sync to version {version} failed after {self.retries + 1} attempts")

    def _on_engines(self, call, version: int) -> None:
        error = None
        if getattr(self.transport, "leader", True):
            try:
                call(version)
            except WeightSyncError as e:
                error = e
        if _any_rank(error is not None):
            raise error or WeightSyncError(f"the weight check around the sync to version {version} failed on "
                                           "another rank")

    def _attempt(self, version: int) -> Exception | None:
        error = None
        try:
            self.transport.start(version)
        except Exception as e:  # noqa: BLE001 - every failure is retried, then reported
            error = e
        count = len(self.exporter.plan.buckets)
        for bucket in self.exporter.buckets(self.transport.receivers):
            try:  # after a failure the transport still takes part in its collectives, but sends nothing
                self.transport.send(bucket, bucket.index == count - 1, version, failed=error is not None)
            except Exception as e:  # noqa: BLE001
                error = error or e
            del bucket  # one bucket alive at a time
        if error is None:
            try:
                self.transport.finish(version)
            except Exception as e:  # noqa: BLE001
                error = e
        return error


class SharedWeights:
    """The engine decodes with the trainer's own weights (rollout.backend=megatron): nothing is copied, a sync
    only moves the engine's weight version."""

    def __init__(self, engine):
        self.engine = engine

    def sync(self, version: int) -> dict:
        self.engine.weight_version = version
        return {"version": version, "attempts": 0, "seconds": 0.0, "bytes": 0, "buckets": 0, "gb_per_s": 0.0}


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class SGLangWeightCheck:
    """SGLang's own weight checker (`/weights_checker`, sglang/srt/utils/weight_checker.py) around the first sync.

    Before it, every engine snapshots its parameters (what its own loader made of the checkpoint it was
    started from) and overwrites them all with random values; after it, the engine compares every parameter
    with the snapshot. So the sync must have written every parameter the engine's model has, through the
    engine's own name mapping, fusion and TP sharding, on the right GPU, with exactly the checkpoint's values:
    a skipped name, a wrong mapping, a tensor that landed elsewhere fail the run, naming the tensors.
    `resync=True` is for a trainer that does not start from the engines' checkpoint (model.init): the first
    sync runs, then snapshot, reset, a second sync, compare (coverage and repeatability; the values are the
    trainer's own; WeightSync runs the extra sync). The snapshot is a host copy of each engine's weights, once per run."""

    def __init__(self, clients, resync: bool = False):
        self.clients, self.resync = clients, resync

    def _all(self, action: str, version: int) -> None:
        for client in self.clients:
            try:
                client.weights_checker(action)
            except DareMegaError as e:
                raise WeightSyncError(f"SGLang's weight check ({action}) around the sync to version {version} "
                                      f"failed on {client.url}: {e}") from e

    def before(self, version: int) -> None:
        self._all("snapshot", version)
        self._all("reset_tensors", version)

    def after(self, version: int) -> None:
        self._all("compare", version)


def check_against_checkpoint(plan, directory: str) -> None:
    """The names, shapes and dtypes a sync sends against the checkpoint the engines loaded at start. SGLang's
    loaders skip names they do not know, so a name the engine's model does not have would otherwise go
    unnoticed (and the engine would keep the checkpoint's tensor)."""
    from dare_mega.storage.safetensors_io import CheckpointReader

    reader = CheckpointReader(directory)
    sent = {name: tuple(shape) for name, _, shape in plan.entries}
    held = {name: tuple(shape) for name, shape in reader.shapes.items()}
    problems = [f"{n} is sent but is not a tensor of the checkpoint" for n in sorted(set(sent) - set(held))]
    problems += [f"{n} {list(held[n])} is in the checkpoint but never sent" for n in sorted(set(held) - set(sent))]
    problems += [f"{n}: sent {list(sent[n])}, the checkpoint holds {list(held[n])}"
                 for n in sorted(set(sent) & set(held)) if sent[n] != held[n]]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise WeightSyncError(f"the weight sync does not match the engines' model ({directory}): "
                              + "; ".join(problems[:8]) + more)
