"""Everything the RL loop needs before its first step, as one `RLJob`.

`check_inputs` reads and checks what can fail cheaply (records and their rewards, the code sandbox, benchmark
files, the model's config and the layout, what SGLang cannot train) before any process group, model or
engine exists; `setup` then builds the trainer (Megatron model, optimizer, runner, the reference when there is
a KL term), the rollout engine and the weight sync, and resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

from dare_mega.config import to_dict
from dare_mega.errors import ConfigError
from dare_mega.trainer.config import RLConfig


def task_records(cfg: RLConfig):
    """(train records, held-out records, the rewards they use). Every record names its reward in `_reward`:
    task.reward when set, else its own (verl / DARE layout: from extra_info.task or data_source), else the
    task's; a record missing what its reward needs is named by file and line (or row) here, before any model."""
    from dare_mega.data.tasks import TASK_REWARDS, make_task
    from dare_mega.rewards import check_fields

    if cfg.task.name == "file":
        from dare_mega.data.records import read_records, rl_record

        records = [rl_record(r, cfg.task.reward) for r in read_records(cfg.task.train)]
        default = cfg.task.reward or "math"
        heldout, train = records[: cfg.task.heldout], records[cfg.task.heldout :]
    else:
        train = make_task(cfg.task.name, cfg.task.train_prompts, seed=cfg.task.seed)
        heldout = make_task(cfg.task.name, cfg.task.heldout, seed=cfg.task.seed + 1_000_003,
                            exclude={r["prompt"] for r in train})
        default = cfg.task.reward or TASK_REWARDS[cfg.task.name]
    if not train:
        raise ConfigError("task: no training prompts left after the held-out split")
    for i, record in enumerate(train + heldout):
        where = record.get("_source", f"record {i}")
        if "prompt" not in record or not record["prompt"]:
            raise ConfigError(f"{where}: needs a 'prompt'")
        record["_reward"] = cfg.task.reward or record.get("_reward") or default
        check_fields(record["_reward"], record, where)
    return train, heldout, sorted({r["_reward"] for r in train + heldout})


@dataclass
class Inputs:
    """What `check_inputs` read and checked."""

    train: list
    heldout: list
    reward_names: list[str]
    sandboxes: str  # where each reward runs, for the start-up line
    benchmarks: dict
    hf_dir: str
    args: object  # ModelArgs
    layout: object  # ParallelLayout


def check_inputs(cfg: RLConfig) -> Inputs:
    from dare_mega.algorithms.estimators import ESTIMATORS
    from dare_mega.rewards import prepare
    from dare_mega.trainer.memory_plan import longest_prompt
    from dare_mega.trainer.setup import check_plan, ensure_model_dir, preflight

    train, heldout, reward_names = task_records(cfg)

    def announce(message):
        print(message, file=sys.stderr, flush=True)

    # a code reward's sandbox is checked (or refused, naming what is missing) before any model or process group
    sandboxes = "; ".join(prepare(name, cfg.reward, log=announce) for name in reward_names)
    benchmarks = {}
    if cfg.eval.tasks:
        from dare_mega.eval.benchmarks import BENCHMARKS, load

        for name in dict.fromkeys(BENCHMARKS[t].reward for t in cfg.eval.tasks if t in BENCHMARKS):
            prepare(name, cfg.reward, log=announce)
    hf_dir = ensure_model_dir(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args, layout = preflight(cfg, hf_dir, world)
    if args.diffusion.attention == "full" and not ESTIMATORS[cfg.algorithm.estimator].masked_diffusion:
        raise ConfigError(f"algorithm.estimator={cfg.algorithm.estimator} is defined for block diffusion only; "
                          f"{args.architecture} ({hf_dir}) is a masked diffusion model (full attention): use one of "
                          + ", ".join(sorted(n for n, e in ESTIMATORS.items() if e.masked_diffusion)))
    check_plan(cfg, args, world, rl=True,
               prompt_tokens=longest_prompt(hf_dir, [r["prompt"] for r in train + heldout]))
    if cfg.algorithm.routing_replay == "rollout" and not args.moe:
        raise ConfigError(f"algorithm.routing_replay=rollout: {args.architecture} ({hf_dir}) has no MoE routers to "
                          "replay; use routing_replay=off")
    if cfg.eval.tasks:  # benchmark files are read (and a missing one named) before any process group exists
        data = cfg.eval.data or os.environ.get("COMPASS_DATA_CACHE")
        if not data:
            raise ConfigError("eval.tasks needs eval.data (or $COMPASS_DATA_CACHE): the directory of benchmark files")
        benchmarks = {task: load(task, data, cfg.eval.limit) for task in cfg.eval.tasks}
    if cfg.rollout.backend == "sglang":
        from dare_mega.rollout.sglang_engine import SGLangServerConfig, check_usable

        SGLangServerConfig.for_model(hf_dir, args, dllm_algorithm=cfg.sglang.dllm_algorithm).algorithm_config()
        check_usable(cfg.sglang.dllm_algorithm, cfg.algorithm.estimator,
                     ESTIMATORS[cfg.algorithm.estimator].needs, cfg.rollout.temperature, cfg.rollout.n,
                     sorted(n for n, e in ESTIMATORS.items() if "step_maps" not in e.needs))
    return Inputs(train, heldout, reward_names, sandboxes, benchmarks, hf_dir, args, layout)


@dataclass
class RLJob:
    """One RL run's state: the data, the trainer, the engine and how weights reach it, and the bookkeeping."""

    cfg: RLConfig
    inputs: Inputs
    env: object  # DistributedEnv
    args: object  # ModelArgs, as built
    chunks: list
    optimizer: object
    scheduler: object
    runner: object  # the policy
    ref_runner: object | None  # the frozen reference (with a KL term)
    engine: object  # generate(), and routed_experts() for MoE routing checks
    weights: object  # WeightSync: trainer -> engine
    estimator: object
    loss_cfg: object  # LossConfig
    routing_probe: object | None  # batch -> the engine's experts for the trainer's rows (MoE)
    metrics: object
    start: int  # the last step done (resumed from)
    checkpoint_dir: str
    meta: dict
    assets: dict
    dp_rank: int
    dp_group: object
    per_rank: int  # prompts per data-parallel rank and step
    offload: object | None = None  # TrainerOffload with train.offload
    replayer: object | None = None  # SGLang rollouts for a step-map estimator: the trainer's shards replay them

    @property
    def replay(self) -> bool:
        return self.cfg.algorithm.routing_replay == "rollout"


def setup(cfg: RLConfig, rollout_backend=None) -> RLJob:
    """`rollout_backend(cfg, hf_dir, env) -> (engine, transport)`: where rollouts run and how weights reach them
    (default: native_rollout, or sglang_rollout with rollout.backend=sglang; the Ray launcher passes remote
    engine actors)."""
    from megatron.core import parallel_state as ps

    from dare_mega.algorithms.estimators import ESTIMATORS, build
    from dare_mega.algorithms.policy import LossConfig
    from dare_mega.checkpoint.torch_dist import load_into
    from dare_mega.models.builder import build_from_hf, mapping_for
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions, params_dtype
    from dare_mega.parallel import init_distributed, init_model_parallel
    from dare_mega.trainer.backends import megatron_rollout, native_rollout, sglang_rollout
    from dare_mega.trainer.metrics import Metrics
    from dare_mega.trainer.offload import TrainerOffload
    from dare_mega.trainer.setup import (
        build_optimizer,
        checkpoint_dir,
        pending_optimizer_state_bytes,
        recompute,
        resume,
        training_meta,
    )
    from dare_mega.weight_sync.export import WeightExporter
    from dare_mega.weight_sync.sync import SharedWeights, WeightSync

    inputs = check_inputs(cfg)
    hf_dir, layout, a = inputs.hf_dir, inputs.layout, cfg.algorithm
    replay = a.routing_replay == "rollout"
    env = init_distributed()
    init_model_parallel(layout, seed=cfg.train.seed)
    dp = ps.get_data_parallel_world_size()
    if cfg.rollout.prompts_per_step % dp:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not divisible by the "
                          f"{dp} data-parallel ranks")

    # the trainer
    dtype = params_dtype(cfg.model.dtype, env.device)
    bias_rate = 0.0 if a.freeze_expert_bias else a.expert_bias_update_rate
    chunks, args = build_from_hf(hf_dir, layout, RuntimeOptions(params_dtype=dtype, expert_bias_update_rate=bias_rate,
                                                                moe_experts=cfg.model.experts,
                                                                routing_replay=replay,
                                                                recompute_granularity=recompute(cfg.train)),
                                 cfg.model.mask_token_id, cfg.model.block_size)
    if cfg.model.init:
        load_into(chunks, cfg.model.init)
    table = mapping_for(args)
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(cfg, chunks, dtype)
    runner = Runner(chunks, args)
    offload = TrainerOffload(chunks, optimizer) if cfg.train.offload else None

    # the engine and the weights' way to it
    if cfg.rollout.backend == "megatron" and rollout_backend is None:
        engine, transport = megatron_rollout(runner, hf_dir), None
    else:
        backend = rollout_backend or (sglang_rollout if cfg.rollout.backend == "sglang" else functools.partial(
            native_rollout, prompts=[r["prompt"] for r in inputs.train + inputs.heldout],
            reserve_bytes=pending_optimizer_state_bytes(optimizer)))
        engine, transport = backend(cfg, hf_dir, env)
    replayer = None
    if cfg.rollout.backend == "sglang" and "step_maps" in ESTIMATORS[a.estimator].needs:
        from dare_mega.rollout.megatron_engine import MegatronEngine
        from dare_mega.rollout.sglang_engine import PROJECT_ALGORITHM

        if getattr(engine, "algorithm", PROJECT_ALGORITHM) != PROJECT_ALGORITHM:
            raise ConfigError(f"algorithm.estimator={a.estimator}: the servers run {engine.algorithm}; the trainer "
                              f"replays trajectories of {PROJECT_ALGORITHM} only")
        replayer = MegatronEngine(runner)
    routes = getattr(engine, "routes", hasattr(engine, "routed_experts"))  # the same answer on every rank
    if replay and not routes:
        raise ConfigError(f"algorithm.routing_replay=rollout: the rollout engine ({type(engine).__name__}) cannot "
                          "report its expert choices; use routing_replay=off")
    routing_probe = None
    if (a.log_router_mismatch or replay) and args.moe and routes:
        def routing_probe(batch):
            return engine.routed_experts(batch.input_ids, batch.position_ids, batch.mask.dense())
    if transport is None:
        weights = SharedWeights(engine)
    else:
        exporter = WeightExporter(chunks, args, table, cfg.rollout.sync_bucket_mb * 1024**2)
        check = None
        if cfg.rollout.backend == "sglang":
            from dare_mega.weight_sync.sync import SGLangWeightCheck, check_against_checkpoint

            check_against_checkpoint(exporter.plan, hf_dir)  # SGLang's loaders would skip a name silently
            if cfg.sglang.check_weights:  # the engines loaded hf_dir; a trainer starting elsewhere re-syncs
                check = SGLangWeightCheck(transport.clients, resync=bool(cfg.model.init))
        weights = WeightSync(exporter, transport, check=check)
    weights.sync(0)

    # resume
    start, _ = resume(cfg, chunks, optimizer, scheduler)
    if start:
        weights.sync(start)
    meta, assets = training_meta(hf_dir, args, layout, dtype, cfg.run_dir, env)

    # the algorithm
    estimator = build(a.estimator, args.diffusion.mask_token_id, a.options)
    loss_cfg = LossConfig(a.eps_low, a.eps_high, a.dual_clip, a.kl_coef, a.kl_kind, a.tis_cap)
    ref_runner = None
    if a.kl_coef:
        ref_chunks, _ = build_from_hf(hf_dir, layout, RuntimeOptions(params_dtype=dtype, routing_replay=replay,
                                                                   moe_experts=cfg.model.experts),
                                      cfg.model.mask_token_id, cfg.model.block_size)
        if cfg.model.init:
            load_into(ref_chunks, cfg.model.init)
        ref_runner = Runner(ref_chunks, args)
    metrics = Metrics(cfg.run_dir, cfg.logging, cfg.train.steps, start, env.is_main, to_dict(cfg), "rl",
                      ("reward_mean", "loss", "clip_fraction", "tokens_per_s"))
    return RLJob(cfg, inputs, env, args, chunks, optimizer, scheduler, runner, ref_runner, engine, weights, estimator,
                 loss_cfg, routing_probe, metrics, start, checkpoint_dir(cfg), meta, assets,
                 ps.get_data_parallel_rank(), ps.get_data_parallel_group(), cfg.rollout.prompts_per_step // dp,
                 offload, replayer)
