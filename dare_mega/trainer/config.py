"""The SFT run's typed config (YAML in configs/recipes/, `section.key=value` overrides on the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dare_mega.config import choices
from dare_mega.errors import ConfigError
from dare_mega.rewards.types import RewardSettings
from dare_mega.rollout.types import POLICIES

LOSSES = ("auto", "sdar_block", "llada2_block", "masked_diffusion")


@dataclass
class ModelSection:
    hf: str | None = None  # HF checkpoint (weights, config, tokenizer); None: a tiny checkpoint made from `preset`
    preset: str = "tiny-sdar-moe"
    mask_token_id: int | None = None  # default: the family's
    block_size: int | None = None  # default: the family's
    dtype: str = field(default="auto", metadata=choices("auto", "float32", "bfloat16"))  # auto: bf16 on GPU
    # MoE experts: grouped (all local experts in one grouped GEMM; Transformer Engine's when installed, else
    # models/experts.py), sequential (Megatron's SequentialMLP: one expert at a time), auto (grouped)
    experts: str = field(default="auto", metadata=choices("auto", "grouped", "sequential"))


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    moe_dispatcher: str = field(default="alltoall", metadata=choices("alltoall", "allgather"))


@dataclass
class DataSection:
    train: str | None = None  # a .jsonl / .parquet file or a directory of them; None: the built-in synthetic set
    task: str | None = None  # instead of `train`: a synthetic verifiable task (dare_mega/data/tasks.py)
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"  # chat records: the last message is the response
    token_budget: int = 256  # tokens per packed micro-batch row (one stream; the two-stream layout doubles it)
    overlong: str = field(default="drop", metadata=choices("drop", "error"))
    # how samples fill rows (data/packing.py): in order (next fit), or first-fit decreasing (fewer rows)
    packing: str = field(default="in_order", metadata=choices("in_order", "ffd"))
    shuffle: bool = True
    synthetic_samples: int = 512
    # pad every sample (prompt + response) with the family's end-of-text/pad id to this many tokens, the padding
    # masked and trained like the response (LLaDA's SFT: responses padded with EOS to a fixed length); 0: only to
    # the block grid. Longer samples are data.overlong's.
    pad_to: int = 0


@dataclass
class LossSection:
    name: str = field(default="auto", metadata=choices(*LOSSES))  # auto: the family's published recipe
    eps: float = 1e-3  # SDAR / masked diffusion: mask rate p = (1 - eps) t + eps
    t_min: float | None = None  # default: 0 (SDAR, masked diffusion) or 0.3 (LLaDA2)
    t_max: float | None = None  # default: 1 (SDAR, masked diffusion) or 0.8 (LLaDA2)
    # the loss's normaliser over the global batch: auto (the objective's: answer lengths for sdar_block, masked
    # tokens for llada2_block and for masked_diffusion, as DARE's LLaDA / Dream trainers), answer, masked
    normalize: str = field(default="auto", metadata=choices("auto", "answer", "masked"))


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = field(default="cosine", metadata=choices("cosine", "linear", "constant"))
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainSection:
    steps: int = 100
    micro_batches: int = 1  # per data-parallel rank per step
    seed: int = 1234
    # activation recomputation in the backward: none, selective (Megatron's core-attention recompute), full
    # (every layer's input kept, the layer recomputed; uniform, one layer per checkpoint)
    recompute: str = field(default="none", metadata=choices("none", "selective", "full"))
    stop_after: int | None = None  # end the process after this step (tests, schedulers with time limits)


@dataclass
class CheckpointSection:
    dir: str | None = None  # default: RUN_DIR/checkpoints
    every: int = 50
    keep: int = 2
    resume: str = "auto"  # "auto": the newest complete checkpoint, if any; "none"; or a checkpoint directory


@dataclass
class LoggingSection:
    wandb: str = field(default="off", metadata=choices("off", "offline", "online"))
    project: str = "dare_mega"
    name: str | None = None
    progress: bool = True


@dataclass
class PlanSection:
    """The memory plan every launch checks first (trainer/memory_plan.py; `python -m dare_mega.plan`)."""

    override: bool = False  # an expert's key: start although the plan says a GPU overflows (logged)
    reserved_gib: float = 4.0  # per GPU, outside the plan: CUDA context, NCCL buffers, allocator slack
    prompt_tokens: int = 1024  # RL: the longest prompt the plan assumes (KV cache, unpacked rows)
    gpu_memory_gib: float | None = None  # default: the GPU's; on CPUs the host's memory per local rank

    def check(self, source: str) -> None:
        if self.reserved_gib < 0 or self.prompt_tokens < 0 or (self.gpu_memory_gib is not None
                                                               and self.gpu_memory_gib <= 0):
            raise ConfigError(f"{source}: plan.reserved_gib={self.reserved_gib} and plan.prompt_tokens="
                              f"{self.prompt_tokens} must be >= 0, plan.gpu_memory_gib={self.gpu_memory_gib} > 0")


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    plan: PlanSection = field(default_factory=PlanSection)

    def check(self, source: str = "config") -> None:
        """Checks that need no model: positive sizes and sane ranges."""
        positive = {
            "data.token_budget": self.data.token_budget, "train.steps": self.train.steps,
            "train.micro_batches": self.train.micro_batches, "checkpoint.every": self.checkpoint.every,
            "checkpoint.keep": self.checkpoint.keep, "parallel.tp": self.parallel.tp, "parallel.pp": self.parallel.pp,
            "parallel.ep": self.parallel.ep, "data.synthetic_samples": self.data.synthetic_samples,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{source}: {key}={value} must be >= 1")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"{source}: optim.lr={self.optim.lr} and optim.min_lr={self.optim.min_lr} need "
                              "0 <= min_lr <= lr, lr > 0")
        for key in ("t_min", "t_max"):
            value = getattr(self.loss, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{source}: loss.{key}={value} must be within [0, 1]")
        if not 0 < self.loss.eps < 1:
            raise ConfigError(f"{source}: loss.eps={self.loss.eps} must be within (0, 1)")
        if not 0 <= self.data.pad_to <= self.data.token_budget:
            raise ConfigError(f"{source}: data.pad_to={self.data.pad_to} must be within [0, data.token_budget="
                              f"{self.data.token_budget}] (a padded sample must fit a row)")
        self.plan.check(source)


# ---- RL ---------------------------------------------------------------------------------------------------


@dataclass
class RLModelSection(ModelSection):
    init: str | None = None  # start from this torch_dist checkpoint (an SFT or RL checkpoint), else model.hf


@dataclass
class TaskSection:
    name: str = "arithmetic"  # a synthetic task (dare_mega/data/tasks.py) or "file"
    train: str | None = None  # name=file: JSONL / Parquet records with `prompt` and the reward's fields
    reward: str | None = None  # default: the task's own (math, arithmetic, countdown, sudoku, code)
    train_prompts: int = 256
    heldout: int = 64
    seed: int = 0


@dataclass
class RolloutSection:
    prompts_per_step: int = 8
    n: int = 4  # completions per prompt (a group)
    max_new_tokens: int = 8
    policy: str = field(default="low_confidence_dynamic", metadata=choices(*POLICIES))
    steps: int | None = None
    threshold: float = 0.9
    # Dream's policies (origin, maskgit_plus, topk_margin, entropy): the temperature of the choice of positions
    # and the end of the timestep schedule
    alg_temp: float = 0.0
    eps: float = 1e-3
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cache: bool = True
    # masked diffusion (LLaDA, Dream) with cache=true: Fast-dLLM's approximate KV cache, prefix (DARE's use_cache)
    # or dual; none decodes them uncached (rollout/masked_cache.py). Block diffusion's cache is exact: not affected
    masked_cache: str = field(default="prefix", metadata=choices("none", "prefix", "dual"))
    # what the low-confidence policies rank by: auto (the family's: raw logits for LLaDA and LLaDA-MoE, as
    # LLaDA's generate and DARE's rollouts; the sampling distribution for the others), sampling, raw
    confidence: str = field(default="auto", metadata=choices("auto", "sampling", "raw"))
    # native: a plain-PyTorch copy per process; megatron: the trainer's own shards (no copy, no sync);
    # sglang: see the sglang section
    backend: str = field(default="native", metadata=choices("native", "megatron", "sglang"))
    sync_bucket_mb: int = 512  # weight sync: exported tensors travel in buckets of at most this size
    # dynamic sampling (DAPO): reward_variance keeps only groups whose rewards differ, drawing more prompts in up
    # to filter_max_rounds rounds per step (trainer/dynamic_sampling.py); none: every group (DARE)
    filter: str = field(default="none", metadata=choices("none", "reward_variance"))
    filter_max_rounds: int = 4


@dataclass
class SGLangSection:
    """rollout.backend=sglang: SGLang servers already running (launched by the cluster script, Ray or by hand)."""

    urls: list[str] = field(default_factory=list)  # http://host:port, one per server; data-parallel rank r uses r % n
    transport: str = field(default="distributed", metadata=choices("colocated", "distributed", "disk"))
    engine_tp: int = 1  # GPUs per server (colocated: the trainer ranks on a server's GPUs, consecutive)
    master_address: str | None = None  # distributed: trainer rank 0's address as the engines see it
    master_port: int = 29600  # distributed: the weight-update group's rendezvous port on trainer rank 0
    weights_dir: str | None = None  # disk: where versions are written (default RUN_DIR/weights)
    # what the servers run: DareMegaDecoding (the project's, samples; python -m dare_mega.rollout.sglang_server)
    # or one of SGLang's own (LowConfidence, JointThreshold: greedy); checked against each server on connect
    dllm_algorithm: str = "DareMegaDecoding"
    # the first sync is checked by SGLang's weight checker: snapshot, reset every parameter, sync, compare
    check_weights: bool = True
    batch_size: int = 64  # requests per /generate call
    # estimators that need step maps (trajectory): each completion's reveal steps and log-probs come from a replay
    # of DareMegaDecoding on the trainer's shards (rollout/replay.py); a forward's logits stay under this size
    replay_logits_mb: int = 1024
    # a step whose replay disagrees with the servers' tokens on more than this fraction stops the run (the servers
    # decode with other weights or settings than the trainer's); numerics alone stay far below it
    replay_max_mismatch: float = 0.2


@dataclass
class AlgorithmSection:
    estimator: str = "trajectory"  # a registered estimator (dare_mega/algorithms/estimators/: one file each)
    options: dict = field(default_factory=dict)  # the estimator's own settings (its Options; unknown keys refused)
    advantage: str = field(default="grpo", metadata=choices("grpo", "rloo"))
    std_normalize: bool = True
    std: str = field(default="unbiased", metadata=choices("unbiased", "population"))  # DARE/verl: unbiased
    group_of_one: str = field(default="reward", metadata=choices("reward", "zero"))  # verl: its reward
    # the likelihood the losses use: raw logits (DARE's block-diffusion actors) or logits / rollout.temperature
    likelihood: str = field(default="raw", metadata=choices("raw", "tempered"))
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_kind: str = field(default="auto", metadata=choices("auto", "k1", "k2", "k3"))  # auto: the estimator's
    tis_cap: float | None = 2.0
    epochs: int = 1  # optimizer steps per rollout, each on a fresh draw of the estimator's noise
    freeze_expert_bias: bool = True  # keep the MoE router's selection bias fixed during RL (LLaDA2)
    expert_bias_update_rate: float = 1.0e-3  # used when freeze_expert_bias is false (aux-loss-free balancing)
    log_router_mismatch: bool = True  # MoE: fraction of (token, layer) whose experts differ, rollout vs train
    # MoE: the trainer's forwards route each token to the experts the rollout engine chose for it (R3); off: DARE
    routing_replay: str = field(default="off", metadata=choices("off", "rollout"))


@dataclass
class EvalSection:
    every: int = 0  # 0: only before and after
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens
    samples: int = 4  # completions per held-out prompt for the sampled accuracy
    batch_size: int = 0  # held-out requests a replica decodes per call (0: its whole share at once); bounds the KV cache
    metric: str = field(default="sampled", metadata=choices("sampled", "greedy"))  # the one the last line reports
    tasks: list[str] = field(default_factory=list)  # benchmark files scored every `every` steps (dare_mega.eval)
    data: str | None = None  # their directory (default $COMPASS_DATA_CACHE)
    limit: int | None = None  # first N items of each


@dataclass
class RLTrainSection:
    steps: int = 20
    seed: int = 1234
    # estimator rows are packed into sequences of up to pack_tokens tokens per stream (0: one row per sequence,
    # padded to the longest); micro_batch_size counts those sequences
    pack_tokens: int = 4096
    micro_batch_size: int = 1
    recompute: str = field(default="none", metadata=choices("none", "selective", "full"))  # as in SFT's train
    # the optimizer state and gradient buffers leave the device for the rollout phase (trainer/offload.py)
    offload: bool = False
    stop_after: int | None = None


@dataclass
class RLConfig:
    run_dir: str = "runs/rl"
    model: RLModelSection = field(default_factory=RLModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    task: TaskSection = field(default_factory=TaskSection)
    reward: RewardSettings = field(default_factory=RewardSettings)  # how task.reward is scored (pool, sandbox)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    sglang: SGLangSection = field(default_factory=SGLangSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    plan: PlanSection = field(default_factory=PlanSection)

    def check(self, source: str = "config") -> None:
        positive = {"rollout.prompts_per_step": self.rollout.prompts_per_step, "rollout.n": self.rollout.n,
                    "rollout.max_new_tokens": self.rollout.max_new_tokens, "train.steps": self.train.steps,
                    "train.micro_batch_size": self.train.micro_batch_size, "algorithm.epochs": self.algorithm.epochs,
                    "rollout.sync_bucket_mb": self.rollout.sync_bucket_mb,
                    "rollout.filter_max_rounds": self.rollout.filter_max_rounds,
                    "task.heldout": self.task.heldout,
                    "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{source}: {key}={value} must be >= 1")
        if self.eval.batch_size < 0:
            raise ConfigError(f"{source}: eval.batch_size={self.eval.batch_size} must be >= 0 (0: a replica's whole "
                              "share per call)")
        if self.train.pack_tokens < 0:
            raise ConfigError(f"{source}: train.pack_tokens={self.train.pack_tokens} must be >= 0 (0: no packing)")
        if self.algorithm.routing_replay == "rollout" and self.train.recompute != "none":
            raise ConfigError(f"{source}: algorithm.routing_replay=rollout with train.recompute="
                              f"{self.train.recompute}: a recomputed forward would route afresh (Megatron's replay "
                              "of the backward is not wired here); turn one of them off")
        if self.rollout.backend == "megatron" and self.algorithm.routing_replay == "rollout":
            raise ConfigError(f"{source}: algorithm.routing_replay=rollout with rollout.backend=megatron: the rollout "
                              "already routes with the trainer's own routers; use routing_replay=off")
        if self.rollout.backend == "sglang" and not self.sglang.urls:
            raise ConfigError(f"{source}: rollout.backend=sglang needs sglang.urls (the servers to use)")
        if not 0.0 <= self.sglang.replay_max_mismatch <= 1.0:
            raise ConfigError(f"{source}: sglang.replay_max_mismatch={self.sglang.replay_max_mismatch} must be within "
                              "[0, 1]")
        if self.sglang.replay_logits_mb < 1:
            raise ConfigError(f"{source}: sglang.replay_logits_mb={self.sglang.replay_logits_mb} must be >= 1")
        if self.task.name == "file" and not self.task.train:
            raise ConfigError(f"{source}: task.name=file needs task.train (a JSONL or Parquet path)")
        if self.optim.lr <= 0:
            raise ConfigError(f"{source}: optim.lr={self.optim.lr} must be > 0")
        self.reward.check(source)
        self.plan.check(source)
        from dare_mega.algorithms.estimators import ESTIMATORS, options_for

        options = options_for(self.algorithm.estimator, self.algorithm.options, source)
        for key in ("mc",):
            if getattr(options, key, 1) < 1:
                raise ConfigError(f"{source}: algorithm.options.{key}={getattr(options, key)} must be >= 1")
        if self.algorithm.routing_replay == "rollout" and self.rollout.backend == "sglang":
            raise ConfigError(f"{source}: algorithm.routing_replay=rollout needs the rollout engine's expert choices "
                              "for the trainer's rows; SGLang's diffusion servers do not return them (use "
                              "rollout.backend=native or the Ray launcher's engines, or routing_replay=off)")
        if self.algorithm.kl_coef and not ESTIMATORS[self.algorithm.estimator].supports_kl:
            raise ConfigError(f"{source}: algorithm.kl_coef={self.algorithm.kl_coef}: the "
                              f"{self.algorithm.estimator} estimator has no KL term")
