"""Where the RL loop's rollouts run and how weights reach them: `backend(cfg, hf_dir, env) -> (engine, transport)`.

native_rollout   the native engine in each trainer process, refreshed in process (the default)
megatron_rollout the trainer's own Megatron shards decode (no weight copy, no transport)
sglang_rollout   running SGLang servers (`sglang.urls`), weights by the colocated / distributed / disk transport
The Ray launcher passes its own (engine actors, dare_mega/cluster/ray_launch.py).
"""

from __future__ import annotations

import os

from dare_mega.errors import ConfigError
from dare_mega.trainer.config import RLConfig


def native_rollout(cfg: RLConfig, hf_dir: str, env, prompts=(), reserve_bytes: int = 0, free_bytes=None):
    """The default backend: one native engine per data-parallel replica, on its first model-parallel rank, in
    the trainer's dtype (bf16 on GPUs), refreshed in process (InProcessTransport); the replica's other ranks get
    its completions (rollout/replica.py). Refused before any weight is read, with the numbers, when the engine
    does not fit in what the trainer left free (less `reserve_bytes`, e.g. optimizer state not yet allocated).
    `prompts`: every prompt the run may decode (the KV cache is sized for the longest); `free_bytes(device)`:
    what is free (default: rollout/memory.available_bytes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dare_mega.models.transformer_config import params_dtype
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.rollout.memory import available_bytes
    from dare_mega.rollout.replica import ReplicaEngine
    from dare_mega.weight_sync.transports import InProcessTransport

    group = ps.get_model_parallel_group()
    leader = dist.get_global_rank(group, 0)
    lead = dist.get_rank() == leader
    dtype = params_dtype(cfg.model.dtype, env.device)
    check_engine_fits(cfg, hf_dir, env, dtype, lead, prompts, reserve_bytes, (free_bytes or available_bytes)(env.device))
    engine = NativeEngine.from_pretrained(hf_dir, dtype=dtype, device=str(env.device)) if lead else None
    if dist.get_world_size(group) > 1:
        engine = ReplicaEngine(engine, group, leader)
    return engine, InProcessTransport(engine)


def check_engine_fits(cfg: RLConfig, hf_dir: str, env, dtype, lead: bool, prompts, reserve_bytes: int,
                      free: int) -> None:
    """Every rank takes part (the verdict is the same everywhere). A GPU holds one rank; host memory is shared
    by the ranks of a node, so on CPUs each node's engines and reserves are added up against its free memory."""
    import socket

    import torch.distributed as dist

    from dare_mega.models.builder import load_model_args, mapping_for
    from dare_mega.rollout.memory import engine_bytes, gib

    need = None
    if lead:
        args = load_model_args(hf_dir, cfg.model.mask_token_id, cfg.model.block_size)
        rows, length = _engine_batch(cfg, hf_dir, prompts, args.diffusion.block_size)
        need = engine_bytes(args, mapping_for(args), dtype, rows, length)
    host = socket.gethostname() if env.device.type == "cpu" else f"{socket.gethostname()}:{env.device}"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (host, need, reserve_bytes, free))
    for where in dict.fromkeys(h for h, *_ in everyone):
        here = [e for e in everyone if e[0] == where]
        engines = [e[1] for e in here if e[1] is not None]
        engine_total, reserved = sum(e.total for e in engines), sum(e[2] for e in here)
        available = min(e[3] for e in here)
        if engines and engine_total + reserved > available:
            e = engines[0]
            raise ConfigError(
                f"rollout.backend=native: {len(engines)} engine(s) on {where} need {gib(engine_total)} and the "
                f"trainer's optimizer state still to come {gib(reserved)}, but {gib(available)} is free. Each engine "
                f"holds the whole model ({gib(e.weights)} of weights in {str(dtype).removeprefix('torch.')}) and a KV "
                f"cache ({gib(e.kv_cache)} for {e.rows} requests x {e.length} positions). Use "
                "rollout.backend=megatron (decodes on the trainer's own shards) or sglang, or more GPUs")


def _engine_batch(cfg: RLConfig, hf_dir: str, prompts, block: int) -> tuple[int, int]:
    """The most requests one engine decodes at once (a step's groups or its share of the held-out evaluation) and
    the longest canvas (the longest prompt plus new tokens, in whole blocks)."""
    from megatron.core import parallel_state as ps

    from dare_mega.trainer.memory_plan import canvas, longest_prompt, rollout_rows

    return rollout_rows(cfg, ps.get_data_parallel_world_size()), canvas(cfg, longest_prompt(hf_dir, prompts), block)


def megatron_rollout(runner, hf_dir: str):
    """rollout.backend=megatron: decoding on the trainer's runner; every rank of a replica runs it together."""
    from dare_mega.data.tokenizer import load_tokenizer
    from dare_mega.rollout.megatron_engine import MegatronEngine

    return MegatronEngine(runner, load_tokenizer(hf_dir))


def sglang_rollout(cfg: RLConfig, hf_dir: str, env):
    """rollout.backend=sglang: running servers (sglang.urls); weights through the configured transport."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dare_mega.data.tokenizer import load_tokenizer
    from dare_mega.models.builder import load_model_args
    from dare_mega.rollout.replica import ReplicaEngine
    from dare_mega.rollout.sglang_client import SGLangClient
    from dare_mega.rollout.sglang_engine import SGLangEngine, SGLangServerConfig
    from dare_mega.weight_sync import transports

    s = cfg.sglang
    args = load_model_args(hf_dir, cfg.model.mask_token_id, cfg.model.block_size)
    server = SGLangServerConfig.for_model(hf_dir, args, tp=s.engine_tp, dllm_algorithm=s.dllm_algorithm)

    def connect():
        return SGLangEngine.connect(s.urls, server, s.batch_size, load_tokenizer(hf_dir),
                                    first=ps.get_data_parallel_rank())

    # a replica's first model-parallel rank talks to the servers, its other ranks get the same completions
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        engine = ReplicaEngine.built_on_leader(connect, group, dist.get_global_rank(group, 0), shared=("algorithm",))
    else:
        engine = connect()
    clients = [SGLangClient(url) for url in s.urls]
    if s.transport == "colocated":
        if env.world_size != s.engine_tp * len(clients):
            raise ConfigError(f"sglang.transport=colocated: {len(clients)} servers x engine_tp={s.engine_tp} GPUs "
                              f"must be the {env.world_size} trainer ranks")
        transport = transports.ColocatedTensorTransport(
            clients, [list(range(i * s.engine_tp, (i + 1) * s.engine_tp)) for i in range(len(clients))])
    elif s.transport == "distributed":
        transport = transports.DistributedTransport(clients, [s.engine_tp] * len(clients),
                                                    s.master_address or os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                                    s.master_port)
    else:
        transport = transports.DiskTransport(clients, s.weights_dir or os.path.join(cfg.run_dir, "weights"), hf_dir)
    return engine, transport
