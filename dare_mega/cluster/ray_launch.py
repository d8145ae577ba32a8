"""RL on a Ray cluster: trainer ranks and rollout engines as actors in one placement group.

    python -m dare_mega.cluster.ray_launch --config configs/recipes/rl_sdar_30b_a3b.yaml \\
        --trainers 24 --engines 1 --engine-gpus 8 --placement disaggregated [--address auto] [overrides...]

Placement (one placement group, bundles packed node by node, so rank order follows nodes and GPUs):
  colocated       bundles 0..T-1 hold the trainer ranks; every trainer rank runs its engine on its own GPU(s)
                  (the native engine in process, weights refreshed in process; SGLang colocated servers take
                  the same bundles with fractional GPUs)
  disaggregated   bundles 0..T-1 trainer ranks, then E engines of `engine_gpus` bundles each; trainer
                  data-parallel ranks send their requests to the engines round-robin, and after every update
                  trainer rank 0 pushes the exported buckets to every engine (here through Ray's object store
                  for the native engine; `DistributedTransport`'s broadcast group for SGLang servers)

Each trainer actor sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the first trainer's node)
and runs the same RL loop as torchrun does (`dare_mega.trainer.rl.run`). Set RAY_AUTH_MODE=disabled for a
local cluster (otherwise Ray 2.60 writes an auth token under ~/.ray).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class EngineActor:
    """The native engine as a Ray actor: what stands in for an SGLang server in disaggregated layouts."""

    def __init__(self, hf_dir: str, device: str = "cpu", threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        from dare_mega.rollout.engine import NativeEngine

        self.engine = NativeEngine.from_pretrained(hf_dir, device=device)
        self.paused = False

    def generate(self, prompts, params, cache=True):
        return self.engine.generate(prompts, params, cache=cache)

    def routed_experts(self, input_ids, position_ids, mask):
        return self.engine.routed_experts(input_ids, position_ids, mask)

    def load_weights(self, named_tensors, version=None):
        return self.engine.load_weights(named_tensors, version=version)

    def weight_version(self):
        return self.engine.weight_version

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False


class RemoteEngine:
    """The RolloutEngine interface over engine actors; trainer rank r uses engine r mod E."""

    def __init__(self, handles: list, rank: int):
        self.handles, self.handle = handles, handles[rank % len(handles)]

    def generate(self, prompts, params, cache=True):
        return ray.get(self.handle.generate.remote(prompts, params, cache))

    def routed_experts(self, input_ids, position_ids, mask):
        return ray.get(self.handle.routed_experts.remote(input_ids, position_ids, mask))

    @property
    def weight_version(self):
        return ray.get(self.handle.weight_version.remote())


class ActorTransport:
    """Weight sync into engine actors: trainer rank 0 receives the buckets and puts each once in the object
    store for all engines; the version rides on the last bucket (transports.py protocol)."""

    def __init__(self, handles: list, rank: int):
        self.handles, self.leader = handles, rank == 0
        self.receivers = 0
        self.clients = []

    def start(self, version):
        if self.leader:
            ray.get([h.pause.remote() for h in self.handles])

    def send(self, bucket, last, version, failed=False):
        if self.leader and not failed:
            ref = ray.put(bucket.tensors)
            ray.get([h.load_weights.remote(ref, version if last else None) for h in self.handles])

    def finish(self, version):
        if self.leader:
            reported = ray.get([h.weight_version.remote() for h in self.handles])
            if any(v != version for v in reported):
                raise RuntimeError(f"engine actors report weight versions {reported}, expected {version}")
            ray.get([h.resume.remote() for h in self.handles])

    def abort(self):
        if self.leader:
            ray.get([h.resume.remote() for h in self.handles])


@ray.remote
class TrainerActor:
    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def run(self, config_path, overrides, rank, world, master_addr, master_port, engines=None, threads=1):
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
                           "OMP_NUM_THREADS": str(threads)})
        import torch

        torch.set_num_threads(threads)
        from dare_mega.config import load_config
        from dare_mega.trainer.config import RLConfig
        from dare_mega.trainer.rl import run

        cfg = load_config(RLConfig, config_path, list(overrides))
        backend = None
        if engines:
            def backend(cfg, hf_dir, env):
                return RemoteEngine(engines, env.rank), ActorTransport(engines, env.rank)
        return run(cfg, rollout_backend=backend)


def launch(config_path: str, overrides: list[str], trainers: int, placement: str = "colocated", engines: int = 1,
           engine_gpus: int = 1, gpus_per_bundle: int | None = None, threads: int = 1) -> dict:
    """Run one RL job on the connected Ray cluster; returns rank 0's result (held-out accuracy before/after)."""
    from dare_mega.config import load_config
    from dare_mega.trainer.config import RLConfig
    from dare_mega.trainer.setup import ensure_model_dir

    if placement not in ("colocated", "disaggregated"):
        raise SystemExit(f"--placement {placement!r}: colocated or disaggregated")
    cfg = load_config(RLConfig, config_path, list(overrides))
    gpu = ray.cluster_resources().get("GPU", 0) > 0 if gpus_per_bundle is None else gpus_per_bundle > 0
    bundle = {"CPU": threads, "GPU": 1} if gpu else {"CPU": threads}
    count = trainers + (engines * engine_gpus if placement == "disaggregated" else 0)
    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    ray.get(group.ready())
    try:
        def on(index):
            return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)

        handles = []
        if placement == "disaggregated":
            hf_dir = ensure_model_dir(cfg)  # the engines start from the same checkpoint as the trainer
            for e in range(engines):
                handles.append(EngineActor.options(scheduling_strategy=on(trainers + e * engine_gpus),
                                                   num_cpus=threads, num_gpus=1 if gpu else 0).remote(
                    hf_dir, "cuda" if gpu else "cpu", threads))
        actors = [TrainerActor.options(scheduling_strategy=on(i), num_cpus=threads, num_gpus=1 if gpu else 0).remote()
                  for i in range(trainers)]
        master = ray.get(actors[0].node_ip.remote())
        port = _free_port()
        results = ray.get([a.run.remote(config_path, overrides, i, trainers, master, port, handles or None, threads)
                           for i, a in enumerate(actors)])
        return results[0]
    finally:
        remove_placement_group(group)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dare_mega.cluster.ray_launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--trainers", type=int, required=True, help="trainer ranks (GPUs)")
    p.add_argument("--placement", default="colocated", choices=["colocated", "disaggregated"])
    p.add_argument("--engines", type=int, default=1, help="disaggregated: rollout engines")
    p.add_argument("--engine-gpus", type=int, default=1, help="disaggregated: GPUs per engine")
    p.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per actor")
    p.add_argument("overrides", nargs="*")
    options = p.parse_args(argv)
    ray.init(address=options.address, num_cpus=options.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}} if options.address is None else None)
    try:
        result = launch(options.config, options.overrides, options.trainers, options.placement, options.engines,
                        options.engine_gpus, threads=options.threads)
    finally:
        ray.shutdown()
    print(f"ray_launch: {options.placement}, {options.trainers} trainer rank(s): {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
