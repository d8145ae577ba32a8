"""The memory plan of a run, per GPU and per phase, from shapes alone (no GPU, no process group, no weights).

Parts, for the worst GPU of each pipeline stage (tensor and expert ranks hold the same sizes; data-parallel
ranks differ only in their optimizer shard):

parameters       Megatron DDP's contiguous parameter buffer (the distributed optimizer remaps every parameter
                 into it): this rank's shards of every row of the family's mapping table, each start padded to
                 64 elements and the buffer to lcm(dp, 128), expert parameters in a buffer of their own at EP > 1;
                 plus the model's buffers (the router's fp32 expert bias)
gradients        the matching fp32 gradient buffers (grad_reduce_in_fp32)
optimizer_state  the distributed optimizer's shard of each buffer: Adam's two fp32 moments per element, and
                 for bf16 models the fp32 main parameters (fp32 models update the parameter buffer in place)
activations      what the backward keeps for the micro-batches in flight on the stage (two-stream rows:
                 2 x tokens per stream; masked diffusion's single stream: 1 x), with train.recompute applied;
                 an estimate, see `layer_activations`
logits           the last stage's logits of one micro-batch in the model's dtype and their fp32 copy
                 (vocab-parallel log-probs keep both)
reference        the frozen reference model's parameters (RL with a KL term)
kv_cache         the rollout's block KV cache for the configured batch and lengths (rollout/memory.py's rule)
engine_weights   a second copy of the model for the rollout (native: the whole model on each replica's first
                 rank; SGLang colocated: its shard; the Megatron backend decodes on the trainer's parameters)
comm_buffers     weight sync's gather buckets (rollout.sync_bucket_mb or the whole model if smaller, twice: the
                 gathered and the exported tensors)

Phase peaks: rollout (parameters, engine, KV cache, and gradients + optimizer state unless train.offload),
train (everything of the trainer and the engine's weights), sync (the trainer, the engine, the buckets).
A plan fits when every peak plus plan.reserved_gib (CUDA context, NCCL, allocator slack) is within the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dare_mega.rollout.memory import GIB, gib

PARAM_ALIGN = 64  # Megatron's _ParamAndGradBuffer: every parameter starts at a multiple of 64 elements
BUCKET_ALIGN = 128  # ... and the buffer ends at a multiple of lcm(dp, 128) (distributed optimizer)

# the order Megatron's modules create a layer's parameters (DDP lays buffers out in reverse of it)
_LAYER_ORDER = ("input_layernorm", "self_attention.linear_proj", "self_attention.linear_qkv.layer_norm",
                "self_attention.linear_qkv", "self_attention.q_layernorm", "self_attention.k_layernorm",
                "pre_mlp_layernorm", "mlp.linear_fc1.layer_norm", "mlp.linear_fc1", "mlp.linear_fc2",
                "mlp.router", "mlp.experts", "mlp.shared_experts")


@dataclass(frozen=True)
class LocalTensor:
    name: str
    numel: int
    itemsize: int
    expert: bool  # in the expert-parallel buffer (reduced over the expert data-parallel group)
    buffer: bool  # a module buffer, not a parameter


def stage_layers(num_layers: int, pp: int, vpp: int | None, pp_rank: int) -> list[list[int]]:
    """The global layer indices of each model chunk of pipeline rank `pp_rank` (Megatron's even split)."""
    chunks = vpp or 1
    per = num_layers // (pp * chunks)
    return [list(range((v * pp + pp_rank) * per, (v * pp + pp_rank + 1) * per)) for v in range(chunks)]


def _order(name: str):
    if name.startswith("embedding."):
        return (0,)
    if name.startswith("decoder.layers."):
        _, _, layer, rest = name.split(".", 3)
        rank = next((i for i, p in enumerate(_LAYER_ORDER) if rest.startswith(p)), len(_LAYER_ORDER))
        expert = -1
        if ".local_experts." in rest:
            expert = int(rest.split(".local_experts.", 1)[1].split(".", 1)[0])
        return (1, int(layer), rank, expert, rest)
    return (2 if name.startswith("decoder.final_layernorm") else 3,)


def chunk_tensors(args, table, layout, dtype: torch.dtype, pp_rank: int) -> list[list[LocalTensor]]:
    """This pipeline rank's tensors per model chunk, in module order: the mapping table's rows, bound to the
    chunk's layers and the rank's local experts, shaped by the rows' own shard rule (TP, or ETP for experts)."""
    from dare_mega.models.transformer_config import padded_vocab_size
    from dare_mega.models.weight_mapping import LayoutContext, dims_of

    vocab = padded_vocab_size(args.vocab_size, layout.tp)
    dims, ctx = dims_of(args, vocab), LayoutContext.of(args, vocab)
    local_experts = args.moe.num_experts // layout.ep if args.moe else 0
    chunks = stage_layers(args.num_layers, layout.pp, layout.vpp, pp_rank)
    first, last = (pp_rank == 0), (pp_rank == layout.pp - 1)
    shapes: dict = {}
    out = []
    for v, layers in enumerate(chunks):
        wanted, tensors = set(layers), []
        for binding in table.bindings():
            row, name = binding.row, binding.megatron_name
            if binding.layer is None:
                embedding = name.startswith("embedding.")
                holds = (first and v == 0) if embedding else (last and v == len(chunks) - 1)
                if embedding and args.tie_word_embeddings and layout.pp > 1 and last and v == len(chunks) - 1:
                    # the last stage keeps its own copy of tied embeddings as the output layer
                    tensors.append(_local(row, "output_layer.weight", dims, ctx, layout, dtype, shapes))
                if not holds:
                    continue
            elif binding.layer not in wanted or (binding.expert is not None and binding.expert >= local_experts):
                continue
            tensors.append(_local(row, name, dims, ctx, layout, dtype, shapes))
        out.append(sorted(tensors, key=lambda t: _order(t.name)))
    return out


def _local(row, name, dims, ctx, layout, dtype, shapes) -> LocalTensor:
    key = (row.megatron, row.expert)
    if key not in shapes:
        hf = [torch.empty(spec.expected_shape(dims), device="meta") for spec in row.hf]
        full = row.to_megatron(hf, ctx)
        size = layout.etp if row.expert else layout.tp
        shapes[key] = math.prod(row.shard(full, 0, size).shape if row.tp_dim is not None else full.shape)
    itemsize = torch.empty(0, dtype=row.dtype or dtype).element_size()
    return LocalTensor(name, shapes[key], itemsize, row.expert, row.buffer)


@dataclass(frozen=True)
class Buffer:
    """One DDP parameter-and-gradient buffer: its padded size and where each parameter starts."""

    numel: int
    starts: tuple[tuple[int, int], ...]  # (start, numel) per parameter, in buffer order
    dp: int

    @classmethod
    def lay_out(cls, numels_in_module_order: list[int], dp: int) -> "Buffer":
        position, starts = 0, []
        for n in reversed(numels_in_module_order):  # DDP walks the parameters backwards (backprop order)
            position = _ceil(position, PARAM_ALIGN)
            starts.append((position, n))
            position += n
        return cls(_ceil(position, math.lcm(dp, BUCKET_ALIGN)) if starts else 0, tuple(starts), dp)

    def shard_numel(self, dp_rank: int) -> int:
        """Elements of this buffer's parameters in data-parallel rank `dp_rank`'s optimizer shard."""
        lo, hi = self.numel * dp_rank // self.dp, self.numel * (dp_rank + 1) // self.dp
        return sum(max(0, min(hi, s + n) - max(lo, s)) for s, n in self.starts)


def _ceil(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass
class RankBytes:
    """The trainer's resident bytes on one rank (the parts counted exactly)."""

    parameters: int
    gradients: int
    optimizer_state: int


def trainer_bytes(args, table, layout, dtype: torch.dtype, world: int, pp_rank: int, dp_rank: int | None = 0,
                  edp_rank: int | None = 0, chunks=None) -> RankBytes:
    """Parameters, gradients and optimizer state of the rank at (pipeline rank, data-parallel rank, expert
    data-parallel rank) after the first optimizer step; a rank of None: the largest shard over that group (the
    worst GPU of the stage). `chunks`: chunk_tensors(...) when already computed."""
    dp = world // (layout.tp * layout.pp)
    edp = world // (layout.ep * layout.etp * layout.pp)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    per_element_state = 8 + (4 if dtype != torch.float32 else 0)
    params = grads = state = 0
    for tensors in chunks or chunk_tensors(args, table, layout, dtype, pp_rank):
        # a router with an expert bias also counts its tokens per expert (Megatron's local_tokens_per_expert)
        params += sum(t.numel * t.itemsize * (2 if t.name.endswith(".expert_bias") else 1)
                      for t in tensors if t.buffer)
        for expert, size, rank in ((False, dp, dp_rank), (True, edp, edp_rank)):
            # routed experts are reduced over the expert data-parallel group only when EP > 1 (Megatron's
            # `allreduce` attribute); at EP = 1 they share the dense buffer
            buffer = Buffer.lay_out([t.numel for t in tensors
                                     if not t.buffer and (t.expert and layout.ep > 1) == expert], size)
            params += buffer.numel * itemsize
            grads += buffer.numel * 4
            ranks = range(size) if rank is None else (rank,)
            state += max(buffer.shard_numel(r) for r in ranks) * per_element_state
    return RankBytes(params, grads, state)


# ---- activations -------------------------------------------------------------------------------------------


def layer_activations(args, layout, tokens: int, itemsize: int, moe: bool, recompute: str,
                      attention: str = "flex") -> int:
    """Bytes one layer keeps for the backward for `tokens` tokens of a micro-batch (both streams): the inputs of
    every norm and linear, q / k / v and the attention output (flash / flex attention: no [s, s] scores), the
    gated MLP's or the routed experts' intermediates (top-k copies of each token), under tensor and sequence
    parallelism; the sdpa backend (CPUs) also keeps its [heads, s, s] probabilities and the dense mask. With full
    recompute a layer keeps its input only."""
    tp, sp = layout.tp, layout.sp
    h = args.hidden_size
    seq = tokens // tp if sp else tokens  # norms and residual inputs are split by sequence parallelism
    if recompute == "full":
        return seq * h * itemsize
    q, kv = args.num_attention_heads * args.head_dim // tp, args.num_kv_heads * args.head_dim // tp
    attention_backend = attention
    attention = 2 * seq * h + tokens * (2 * (q + 2 * kv) + q)  # norm in, qkv in; q/k/v (pre and post norm), out
    if recompute != "selective":
        core = tokens * q + tokens * args.num_attention_heads // tp * 2  # the output, its log-sum-exp (fp32)
        if attention_backend == "sdpa":
            core += tokens * tokens * (args.num_attention_heads // tp) + tokens * tokens // itemsize
        attention += core
    if moe:
        m = args.moe
        # each rank dispatches its own (sequence-parallel) tokens; expert tensor parallelism gathers its group's
        routed = seq * m.topk * layout.etp if sp else tokens * m.topk
        ffn = m.expert_ffn_hidden_size // layout.etp
        mlp = seq * h + seq * m.num_experts * 2 + routed * (2 * h + 3 * ffn)  # norm in, router (fp32), experts
        if m.shared_expert_ffn_hidden_size:
            mlp += tokens * (h + 3 * m.shared_expert_ffn_hidden_size // tp)
    else:
        mlp = seq * h + tokens * (h + 3 * args.ffn_hidden_size // tp)  # norm in, fc1 in, fc1 out (2f), fc2 in
    return (attention + mlp) * itemsize


def micro_batch_activations(args, layout, layers, tokens: int, itemsize: int, recompute: str,
                            last_stage: bool, attention: str = "flex") -> tuple[int, int]:
    """(the layers' activations, the last stage's logits) of one micro-batch of `tokens` tokens."""
    vocab = padded_vocab(args, layout)
    acts = sum(layer_activations(args, layout, tokens, itemsize, args.layer_is_moe(i), recompute, attention)
               for i in layers)
    logits = tokens * (vocab // layout.tp) * (4 + itemsize) if last_stage else 0  # the output and its fp32 copy
    return acts, logits


def padded_vocab(args, layout) -> int:
    from dare_mega.models.transformer_config import padded_vocab_size

    return padded_vocab_size(args.vocab_size, layout.tp)


def in_flight(layout, micro_batches: int, pp_rank: int) -> float:
    """Micro-batches' worth of this stage's activations held at once: 1F1B warms rank p up with pp - p
    micro-batches; the interleaved schedule with 2 (pp - p - 1) + (vpp - 1) pp + 1 model chunks (each 1 / vpp of
    the stage), as Megatron's schedules do; never more than the step has (0: unknown, assumed enough)."""
    if layout.pp == 1:
        return 1.0
    if layout.vpp:
        chunks = 2 * (layout.pp - pp_rank - 1) + (layout.vpp - 1) * layout.pp + 1
        depth = chunks / layout.vpp
    else:
        depth = float(layout.pp - pp_rank)
    return min(depth, float(micro_batches)) if micro_batches else depth


# ---- the plan ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    world: int
    gpu_bytes: int
    reserved: int
    parts: dict[str, int]  # the worst stage's bytes per part
    phases: dict[str, dict[str, int]]  # phase -> the parts resident in it
    notes: list[str] = field(default_factory=list)

    def peak(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def worst(self) -> tuple[str, int]:
        return max(((p, self.peak(p)) for p in self.phases), key=lambda item: item[1])

    @property
    def fits(self) -> bool:
        return self.worst[1] + self.reserved <= self.gpu_bytes

    def verdict(self) -> str:
        phase, peak = self.worst
        usable = self.gpu_bytes - self.reserved
        parts = ", ".join(f"{k} {gib(v)}" for k, v in sorted(self.phases[phase].items(), key=lambda kv: -kv[1]) if v)
        word = "fits" if self.fits else "does NOT fit"
        return (f"{word}: the {phase} phase peaks at {gib(peak)} per GPU ({parts}) against {gib(usable)} usable "
                f"({gib(self.gpu_bytes)} less plan.reserved_gib={self.reserved / GIB:g})")

    def table(self) -> str:
        lines = [f"{'part':<18}{'per GPU':>14}"] + [f"{k:<18}{gib(v):>14}" for k, v in self.parts.items()]
        lines.append("")
        for phase, parts in self.phases.items():
            lines.append(f"peak {phase:<13}{gib(sum(parts.values())):>14}   ({' + '.join(k for k, v in parts.items() if v)})")
        return "\n".join(lines + [""] + self.notes + [self.verdict()])

    def to_dict(self) -> dict:
        return {"world": self.world, "gpu_bytes": self.gpu_bytes, "reserved_bytes": self.reserved,
                "parts": self.parts, "peaks": {p: self.peak(p) for p in self.phases}, "fits": self.fits,
                "verdict": self.verdict(), "notes": self.notes}


def plan(cfg, args, world: int, gpu_bytes: int, rl: bool, dtype: torch.dtype | None = None,
         attention: str = "flex", prompt_tokens: int | None = None) -> Plan:
    """The plan of an SFT (rl=False) or RL config on `world` GPUs of `gpu_bytes` each (`dtype`: the parameters';
    default model.dtype, auto meaning bf16 as on GPUs; `attention`: the backend, flex on GPUs; `prompt_tokens`:
    the longest prompt when the prompts are known, default plan.prompt_tokens)."""
    from dare_mega.models.builder import mapping_for
    from dare_mega.parallel.layout import ParallelLayout

    p = cfg.parallel
    layout = ParallelLayout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp, moe_dispatcher=p.moe_dispatcher)
    layout.check_world(world)
    dtype = dtype or (torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    table = mapping_for(args)
    dp = world // (layout.tp * layout.pp)  # the rollout's replicas
    notes: list[str] = []

    prompt_tokens = cfg.plan.prompt_tokens if prompt_tokens is None else prompt_tokens
    streams = 1 if args.diffusion.attention == "full" else 2  # masked diffusion trains on x_t alone
    if rl:
        row = prompt_tokens + cfg.rollout.max_new_tokens  # a row longer than pack_tokens is a sequence alone
        tokens = streams * max(cfg.train.pack_tokens, row) * cfg.train.micro_batch_size
        micro_batches = 0  # the step's rows decide; the stage is assumed full
        recompute = cfg.train.recompute
    else:
        tokens, micro_batches, recompute = streams * cfg.data.token_budget, cfg.train.micro_batches, cfg.train.recompute

    stages = []
    for pp_rank in range(layout.pp):
        chunks = chunk_tensors(args, table, layout, dtype, pp_rank)
        trainer = trainer_bytes(args, table, layout, dtype, world, pp_rank, None, None, chunks)
        layers = [i for chunk in stage_layers(args.num_layers, layout.pp, layout.vpp, pp_rank) for i in chunk]
        per_mb, logits = micro_batch_activations(args, layout, layers, tokens, itemsize, recompute,
                                                 pp_rank == layout.pp - 1, attention)
        activations = int(per_mb * in_flight(layout, micro_batches, pp_rank))
        if recompute == "full" and layers:  # the layer being recomputed holds its whole activations
            activations += layer_activations(args, layout, tokens, itemsize, args.layer_is_moe(layers[-1]), "none",
                                             attention)
        stage = {"parameters": trainer.parameters, "gradients": trainer.gradients,
                 "optimizer_state": trainer.optimizer_state, "activations": activations,
                 "logits": logits}
        if rl:
            stage.update(rollout_parts(cfg, args, layout, dtype, dp, len(layers), table, notes, prompt_tokens))
            if cfg.algorithm.kl_coef:  # the frozen reference: the same shards, outside DDP's buffers
                stage["reference"] = sum(t.numel * t.itemsize for c in chunks for t in c)
        stages.append(stage)

    parts: dict[str, int] = {}
    phases: dict[str, dict[str, int]] = {}
    for stage in stages:
        for k, v in stage.items():
            parts[k] = max(parts.get(k, 0), v)
        trainer_parts = {k: stage[k] for k in ("parameters", "gradients", "optimizer_state")}
        resident = {k: stage.get(k, 0) for k in ("reference", "engine_weights")}
        these = {"train": {**trainer_parts, **resident, "activations": stage["activations"],
                           "logits": stage["logits"]}}
        if rl:
            kept = {"parameters": stage["parameters"]} if cfg.train.offload else trainer_parts
            these["rollout"] = {**kept, **resident, "kv_cache": stage["kv_cache"],
                                "rollout_logits": stage["rollout_logits"]}
            these["sync"] = {**trainer_parts, **resident, "comm_buffers": stage["comm_buffers"]}
        for phase, resident_parts in these.items():
            if phase not in phases or sum(resident_parts.values()) > sum(phases[phase].values()):
                phases[phase] = resident_parts
    if rl and cfg.train.offload:
        notes.append("train.offload: the optimizer state and gradients are in host memory during the rollout")
    return Plan(world, gpu_bytes, int(cfg.plan.reserved_gib * GIB), parts, phases, list(dict.fromkeys(notes)))


def rollout_parts(cfg, args, layout, dtype, replicas: int, n_layers: int, table, notes: list,
                  prompt_tokens: int) -> dict[str, int]:
    """The RL-only parts of one pipeline stage's rank: KV cache, engine weights, the decoding forward's logits,
    weight sync's buckets."""
    from dare_mega.algorithms.estimators import ESTIMATORS
    from dare_mega.rollout.memory import engine_bytes

    itemsize = torch.empty(0, dtype=dtype).element_size()
    r, block = cfg.rollout, args.diffusion.block_size
    rows, length = rollout_rows(cfg, replicas), canvas(cfg, prompt_tokens, block)
    out = {"engine_weights": 0, "kv_cache": 0, "comm_buffers": 0}
    full = args.diffusion.attention == "full"  # masked diffusion: Fast-dLLM's caches (or none)
    cached = r.cache and not (full and r.masked_cache == "none")
    # tokens of one decoding forward: a block with the block KV cache; the canvas without it, and at each block's
    # first step of Fast-dLLM's caches (the uncached forward of the whole canvas refreshes them)
    decoded = rows * (block if r.cache and not full else length)
    out["rollout_logits"] = decoded * args.vocab_size * 4
    if r.backend == "megatron":
        per_position = 2 * args.num_kv_heads // layout.tp * args.head_dim * itemsize
        out["kv_cache"] = (rows + 1) * (length + block) * per_position * n_layers if cached else 0
        out["rollout_logits"] //= layout.tp
    elif r.backend == "native":
        engine = engine_bytes(args, table, dtype, rows, length)
        out["engine_weights"] = engine.weights
        out["kv_cache"] = engine.kv_cache if cached else 0
        out["comm_buffers"] = 2 * min(r.sync_bucket_mb * 1024**2, engine.weights)
        notes.append("rollout.backend=native: the whole model and its KV cache on each data-parallel replica's "
                     "first rank (the worst GPU)")
    else:
        weights = engine_bytes(args, table, dtype, rows, length).weights
        out["comm_buffers"] = 2 * min(r.sync_bucket_mb * 1024**2, weights)
        out["rollout_logits"] = 0
        if "step_maps" in ESTIMATORS[cfg.algorithm.estimator].needs:
            # the replay's forwards (rollout/replay.py): rows of twice the canvas, the window of the response's
            # blocks gathered to the full vocabulary, in rows that keep it under sglang.replay_logits_mb
            budget = cfg.sglang.replay_logits_mb * 1024**2
            chunk = min(rows, max(1, budget // (length * args.vocab_size * 4)))
            out["rollout_logits"] = chunk * length * args.vocab_size * 4 + \
                chunk * 2 * length * (args.vocab_size // layout.tp) * itemsize
            notes.append("sglang with a step-map estimator: the trainer replays the rollouts (forward only)")
        if cfg.sglang.transport == "colocated":
            out["engine_weights"] = weights // cfg.sglang.engine_tp
            notes.append("sglang colocated: its KV cache is SGLang's own (--mem-fraction-static), not counted")
        else:
            notes.append("sglang: the servers have their own GPUs; the trainer's hold the sync buckets only")
    return out


def rollout_rows(cfg, replicas: int) -> int:
    """The most requests one replica decodes at once: the step's groups, or its share of the held-out
    evaluation (eval.batch_size per call when set)."""
    per_rank = cfg.rollout.prompts_per_step // replicas
    evaluation = -(-cfg.task.heldout // replicas) * max(cfg.eval.samples, 1)
    return max(per_rank * cfg.rollout.n, min(evaluation, cfg.eval.batch_size or evaluation))


def canvas(cfg, prompt_tokens: int, block: int) -> int:
    """The longest canvas a request decodes: its prompt plus the new tokens, in whole blocks."""
    return _ceil(prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0), block)


def longest_prompt(hf_dir: str, prompts) -> int:
    """The longest of `prompts` in the checkpoint's tokens (chat template applied as the engines do)."""
    from dare_mega.data.tokenizer import load_tokenizer
    from dare_mega.rollout.types import prompt_ids

    tokenizer = load_tokenizer(hf_dir)
    return max((len(prompt_ids(p, tokenizer)) for p in prompts), default=0)
