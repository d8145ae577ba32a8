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
    def __init__(self, exporter: WeightExporter, transport: Transport, retries: int = 2, check=None,
                 check_names: tuple[str, ...] = ()):
        """`check(version, sent)`, optional, runs after a successful sync on the ranks that received buckets and
        raises on mismatch; `sent` holds the first 100 values of each tensor named in `check_names` as they
        were sent (SGLangWeightCheck compares them with what the engines report)."""
        self.exporter, self.transport, self.retries, self.check = exporter, transport, retries, check
        self.check_names = set(check_names)
        self.sent: dict[str, list[float]] = {}

    def sync(self, version: int) -> dict:
        clock = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            error = self._attempt(version)
            if not _any_rank(error is not None):
                break
            self.transport.abort()
            if error is not None:
                print(f"weight sync to version {version}: attempt {attempt} failed: {error}", file=sys.stderr,
                      flush=True)
        else:
            raise WeightSyncError(f"weight sync to version {version} failed after {self.retries + 1} attempts")
        if self.check is not None and self.sent and getattr(self.transport, "leader", True):
            self.check(version, self.sent)
        seconds = time.perf_counter() - clock
        nbytes = self.exporter.plan.total_bytes
        return {"version": version, "attempts": attempt, "seconds": seconds, "bytes": nbytes,
                "buckets": len(self.exporter.plan.buckets), "gb_per_s": nbytes / max(seconds, 1e-9) / 1e9}

    def _attempt(self, version: int) -> Exception | None:
        error = None
        try:
            self.transport.start(version)
        except Exception as e:  # noqa: BLE001 - every failure is retried, then reported
            error = e
        count = len(self.exporter.plan.buckets)
        for bucket in self.exporter.buckets(self.transport.receivers):
            for name, tensor in bucket.tensors:
                if name in self.check_names:
                    self.sent[name] = tensor.detach().flatten()[:100].float().cpu().tolist()
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
    """After a sync, read tensors back from every engine (/get_weights_by_name) and compare them with what was
    sent. Use names SGLang keeps unfused (embeddings, final norm, lm_head: the mapping table's global rows)."""

    def __init__(self, clients, atol: float = 0.0):
        self.clients, self.atol = clients, atol

    def __call__(self, version: int, sent: dict[str, list[float]]) -> None:
        for client in self.clients:
            for name, values in sent.items():
                got = client.get_weights_by_name(name, truncate_size=len(values))
                flat = torch.tensor(got, dtype=torch.float64).flatten()[: len(values)]
                worst = float((flat - torch.tensor(values, dtype=torch.float64)).abs().max())
                if flat.numel() != len(values) or worst > self.atol:
                    raise WeightSyncError(f"{client.url}: {name} after the sync to version {version} differs from "
                                          f"what the trainer sent (max |diff| {worst:.3g} > {self.atol})")
