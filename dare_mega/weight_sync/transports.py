"""How exported buckets reach rollout engines. One protocol for all (sync.py drives it):

  start(version)             pause generation, open the engine's update session
  send(bucket, last, ver, failed)
                             one bucket; the weight version rides on the LAST call only, so an engine whose
                             update stopped halfway still reports the previous version. After a failure
                             (`failed`) a transport still takes part in its collectives but sends nothing.
  finish(version)            close the session, check the engine's reported version, continue generating
  abort()                    close the session and continue (the retry then starts from the first bucket)

Transports: in-process (the native engine, in every trainer process), SGLang colocated (CUDA-IPC handles of a
flattened bucket gathered from the trainer ranks on the engine's GPUs; update_weights_from_tensor), SGLang
disaggregated (metadata by HTTP, data by broadcast in a process group shared with the engines;
update_weights_from_distributed), and disk (HF safetensors + update_weights_from_disk).

HTTP calls are made by a transport's leader rank(s); every rank runs every method (collectives inside).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import threading

import torch
import torch.distributed as dist

from dare_mega.rollout.sglang_client import SGLangClient, SGLangError
from dare_mega.weight_sync.export import Bucket
from dare_mega.weight_sync.wire import flatten, serialize


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Transport:
    receivers: str | int = "all"  # which ranks need the buckets (WeightExporter.buckets)

    def start(self, version: int) -> None:
        pass

    def send(self, bucket: Bucket, last: bool, version: int, failed: bool = False) -> None:
        raise NotImplementedError

    def finish(self, version: int) -> None:
        pass

    def abort(self) -> None:
        pass


# ---- in process ---------------------------------------------------------------------------------------------
class InProcessTransport(Transport):
    """The native engine in this process (every trainer rank that generates holds one)."""

    receivers = "all"

    def __init__(self, engine):
        self.engine = engine

    def send(self, bucket, last, version, failed=False):
        if not failed:
            self.engine.load_weights(bucket.tensors, version=version if last else None)

    def finish(self, version):
        if self.engine.weight_version != version:
            raise SGLangError(f"native engine reports weight version {self.engine.weight_version}, expected {version}")


# ---- SGLang: session handling shared by the HTTP transports ------------------------------------------------
class _SGLangSession(Transport):
    def __init__(self, clients: list[SGLangClient], leader: bool):
        self.clients, self.leader = clients, leader

    def start(self, version):
        if self.leader:
            for client in self.clients:
                client.pause_generation("retract")
                client.begin_weight_update()

    def finish(self, version):
        if self.leader:
            for client in self.clients:
                client.end_weight_update()
                client.flush_cache(timeout=60.0)
                reported = client.weight_version()
                if reported != str(version):
                    raise SGLangError(f"{client.url} reports weight version {reported!r} after the update to {version}")
                client.continue_generation()

    def abort(self):
        if self.leader:
            for client in self.clients:
                for call in (client.end_weight_update, client.continue_generation):
                    try:
                        call()
                    except SGLangError:
                        pass  # a session that was never opened, or an engine that is down: the retry will tell


class ColocatedTensorTransport(_SGLangSession):
    """Engines on the trainer's GPUs. `engine_ranks[i]` are the trainer ranks sitting on engine i's GPUs, in
    the engine's TP order; each serializes its own copy of the flattened bucket (CUDA-IPC handles on GPUs),
    the first of them gathers the handles and calls update_weights_from_tensor (entry k for TP rank k)."""

    receivers = "all"

    def __init__(self, clients: list[SGLangClient], engine_ranks: list[list[int]]):
        rank = _rank()
        self.groups = [dist.new_group(ranks, backend="gloo") for ranks in engine_ranks]  # every rank creates all
        mine = [i for i, ranks in enumerate(engine_ranks) if rank in ranks]
        self.engine = mine[0] if mine else None
        self.ranks = engine_ranks[self.engine] if mine else []
        leader = bool(mine) and rank == self.ranks[0]
        super().__init__([clients[self.engine]] if leader else [], leader)

    def send(self, bucket, last, version, failed=False):
        if self.engine is None:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        payload = flatten(bucket.tensors, device=device)  # a new buffer per bucket: the server copies it later
        handles = [None] * len(self.ranks) if self.leader else None
        group = self.groups[self.engine]
        dist.gather_object(serialize(payload), handles, dst=self.ranks[0], group=group)
        try:
            if self.leader and not failed:
                self.clients[0].update_weights_from_tensor(handles, "flattened_bucket",
                                                           str(version) if last else None)
        finally:
            dist.barrier(group=group)  # the buffers stay alive until the engine has loaded them


class DistributedTransport(_SGLangSession):
    """Engines elsewhere: trainer rank `sender` joins a process group with every engine TP rank (rank 0; engine
    i's ranks from rank_offset), sends the metadata by HTTP and the flattened bucket by one broadcast."""

    def __init__(self, clients: list[SGLangClient], engine_tp: list[int], master_address: str, master_port: int,
                 group_name: str = "dare_mega_weights", backend: str | None = None, sender: int = 0):
        self.receivers = sender
        super().__init__(clients, _rank() == sender)
        self.engine_tp, self.group_name = engine_tp, group_name
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master = (master_address, master_port)
        self.group = None

    def _connect(self):
        world = 1 + sum(self.engine_tp)
        offsets = [1 + sum(self.engine_tp[:i]) for i in range(len(self.clients))]
        errors: list[Exception] = []

        def join(client, offset):
            try:
                client.init_weights_update_group(*self.master, offset, world, self.group_name, self.backend)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=join, args=(c, o)) for c, o in zip(self.clients, offsets)]
        for t in threads:
            t.start()
        self.group = custom_process_group(self.backend, *self.master, world, 0, self.group_name)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def start(self, version):
        if self.leader and self.group is None:
            self._connect()
        super().start(version)

    def send(self, bucket, last, version, failed=False):
        if not self.leader or failed:
            return
        payload = flatten(bucket.tensors)
        meta = payload["metadata"]
        names = [m.name for m in meta]
        dtypes = [str(m.dtype).replace("torch.", "") for m in meta]
        shapes = [list(m.shape) for m in meta]
        errors: list[Exception] = []

        def announce(client):
            try:
                client.update_weights_from_distributed(names, dtypes, shapes, self.group_name, "flattened_bucket",
                                                       str(version) if last else None)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=announce, args=(c,)) for c in self.clients]
        for t in threads:
            t.start()
        flat = payload["flattened_tensor"]
        if self.backend == "nccl":
            flat = flat.cuda()
        dist.broadcast(flat, src=0, group=self.group)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def close(self):
        if self.leader and self.group is not None:
            for client in self.clients:
                client.destroy_weights_update_group(self.group_name)
            dist.destroy_process_group(self.group)
            self.group = None


def custom_process_group(backend: str, address: str, port: int, world_size: int, rank: int, group_name: str,
                         timeout: float = 600.0):
    """A process group outside the default one, built the way SGLang's engines build their side of it
    (tcp rendezvous, a PrefixStore named after the group), so that both ends meet in the same store keys."""
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world

    wait = datetime.timedelta(seconds=timeout)
    # the store SGLang's tcp:// rendezvous makes (rank 0 hosts it), built directly: under torchrun,
    # rendezvous() would join the elastic agent's store instead (TORCHELASTIC_USE_AGENT_STORE) and never meet
    store = TCPStore(address, port, world_size, is_master=rank == 0, timeout=wait)
    group = _new_process_group_helper(world_size, rank, [], backend, PrefixStore(group_name, store),
                                      group_name=group_name, timeout=wait)
    group = group[0] if isinstance(group, tuple) else group
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class DiskTransport(_SGLangSession):
    """HF safetensors written by rank `writer` under `directory/v<version>` (hidden until complete), then
    update_weights_from_disk on every engine. Older versions are removed; `assets_dir` holds config.json and
    the tokenizer (copied next to the weights, as SGLang loads a whole model directory)."""

    def __init__(self, clients: list[SGLangClient], directory: str, assets_dir: str | None = None, writer: int = 0,
                 keep: int = 1, on_written=None):
        """`on_written(path)`: told of each complete export (SGLangEngine.weights_path: restarts load it)."""
        self.receivers = writer
        self.on_written = on_written
        super().__init__(clients, _rank() == writer)
        self.directory, self.assets_dir, self.keep = directory, assets_dir, keep
        self.files: list[str] = []
        self.tmp = None

    def start(self, version):
        if self.leader:
            for client in self.clients:
                client.pause_generation("retract")  # no session for disk loads
            self.tmp = os.path.join(self.directory, f".v{version}.partial")
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.makedirs(self.tmp)
            self.files, self.index = [], {}

    def send(self, bucket, last, version, failed=False):
        if not self.leader or failed:
            return
        from safetensors.torch import save_file

        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file({n: t.contiguous().cpu() for n, t in bucket.tensors}, os.path.join(self.tmp, name),
                  metadata={"format": "pt"})
        self.files.append(name)
        self.index.update({n: name for n, _ in bucket.tensors})
        if last:
            final = os.path.join(self.directory, f"v{version}")
            with open(os.path.join(self.tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": self.index}, f, indent=2)
            if self.assets_dir:  # config, generation config, tokenizer: never the directory's own weights
                from dare_mega.checkpoint.torch_dist import source_assets

                for asset in source_assets(self.assets_dir):
                    shutil.copy2(os.path.join(self.assets_dir, asset), os.path.join(self.tmp, asset))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(self.tmp, final)
            if self.on_written is not None:
                self.on_written(final)
            for client in self.clients:
                client.update_weights_from_disk(final, str(version))
            self._prune(version)

    def _prune(self, version):
        versions = sorted(int(d[1:]) for d in os.listdir(self.directory) if d.startswith("v") and d[1:].isdigit())
        for old in versions[: -self.keep]:
            if old != version:
                shutil.rmtree(os.path.join(self.directory, f"v{old}"), ignore_errors=True)

    def finish(self, version):
        if self.leader:
            for client in self.clients:
                reported = client.weight_version()
                if reported != str(version):
                    raise SGLangError(f"{client.url} reports weight version {reported!r} after the update to {version}")
                client.continue_generation()

    def abort(self):
        if self.leader:
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
            for client in self.clients:
                try:
                    client.continue_generation()
                except SGLangError:
                    pass
