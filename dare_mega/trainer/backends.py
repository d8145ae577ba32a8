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


def native_rollout(cfg: RLConfig, hf_dir: str, env):
    """The default backend: a native engine in this process, refreshed in process (InProcessTransport)."""
    from dare_mega.rollout.engine import NativeEngine
    from dare_mega.weight_sync.transports import InProcessTransport

    engine = NativeEngine.from_pretrained(hf_dir, device=str(env.device))
    return engine, InProcessTransport(engine)


def megatron_rollout(runner, hf_dir: str):
    """rollout.backend=megatron: decoding on the trainer's runner; every rank of a replica runs it together."""
    from dare_mega.data.tokenizer import load_tokenizer
    from dare_mega.rollout.megatron_engine import MegatronEngine

    return MegatronEngine(runner, load_tokenizer(hf_dir))


def sglang_rollout(cfg: RLConfig, hf_dir: str, env):
    """rollout.backend=sglang: running servers (sglang.urls); weights through the configured transport."""
    from megatron.core import parallel_state as ps

    from dare_mega.data.tokenizer import load_tokenizer
    from dare_mega.models.builder import load_model_args
    from dare_mega.rollout.sglang_client import SGLangClient
    from dare_mega.rollout.sglang_engine import SGLangEngine, SGLangServerConfig
    from dare_mega.weight_sync import transports

    s = cfg.sglang
    args = load_model_args(hf_dir, cfg.model.mask_token_id, cfg.model.block_size)
    server = SGLangServerConfig(hf_dir, tp=s.engine_tp, dllm_algorithm=s.dllm_algorithm)
    engine = SGLangEngine.connect(s.urls, server, s.batch_size, load_tokenizer(hf_dir),
                                  args.diffusion.block_size, first=ps.get_data_parallel_rank())
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
