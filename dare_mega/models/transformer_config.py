"""ModelArgs + ParallelLayout -> Megatron-Core TransformerConfig, and the checks that come before it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dare_mega.errors import ConfigError
from dare_mega.models.args import ModelArgs
from dare_mega.parallel.layout import ParallelLayout


def params_dtype(choice: str, device: torch.device) -> torch.dtype:
    """model.dtype / --dtype: auto is bfloat16 on GPUs and float32 on CPUs."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run (not what the model is): dtype, kernels, recompute."""

    params_dtype: torch.dtype = torch.float32
    attention_backend: str = "auto"  # "auto" | "flex" | "sdpa"
    use_transformer_engine: bool | None = None  # None: when importable and CUDA is present
    # MoE experts: "grouped" (every local expert in one grouped GEMM: Transformer Engine's, else
    # models/experts.py), "sequential" (Megatron's SequentialMLP, one expert at a time), "auto" (grouped)
    moe_experts: str = "auto"
    make_vocab_size_divisible_by: int = 128
    recompute_granularity: str | None = None  # None | "full" | "selective"
    # None: no load-balancing loss (the parity default; SDAR's HF training leaves it off, output_router_logits
    # false). The HF config's router_aux_loss_coef is kept in MoEArgs.aux_loss_coef for recipes that want it.
    moe_aux_loss_coef: float | None = None
    expert_bias_update_rate: float = 0.0  # routers with an expert bias: 0 keeps it fixed (RL default)
    init_weights: bool = True  # False: skip random init (weights are loaded next, or the model is on meta)
    routing_replay: bool = False  # MoE routers can take given expert choices (Batch.experts; models/routing.py)


def check_layout(args: ModelArgs, layout: ParallelLayout, source: str = "config.json") -> None:
    """Raise a ConfigError naming the key and the size when `layout` cannot shard this model."""
    problems = []

    def divides(size_name: str, size: int, key: str, value: int, why: str = ""):
        if value % size:
            problems.append(f"{key}={value} is not divisible by {size_name}={size}{why}")

    divides("tp", layout.tp, "num_attention_heads", args.num_attention_heads)
    divides("tp", layout.tp, "num_key_value_heads", args.num_kv_heads,
            " (attention tensor parallelism cannot exceed or split the KV heads)")
    if any(not args.layer_is_moe(i) for i in range(args.num_layers)):
        divides("tp", layout.tp, "intermediate_size", args.ffn_hidden_size)
    chunks = layout.pp * layout.num_chunks
    divides("pp*vpp" if layout.vpp else "pp", chunks, "num_hidden_layers", args.num_layers)
    if args.moe:
        key = "num_experts"
        divides("ep", layout.ep, key, args.moe.num_experts)
        divides("etp", layout.etp, "moe_intermediate_size", args.moe.expert_ffn_hidden_size)
        if args.moe.shared_expert_ffn_hidden_size:
            divides("tp", layout.tp, "shared expert intermediate size", args.moe.shared_expert_ffn_hidden_size)
        if layout.tp > 1 and not layout.sp:
            problems.append("MoE with tp > 1 needs sequence parallelism (sequence_parallel=False was asked)")
        if args.moe.num_groups and args.moe.num_groups % layout.ep and layout.ep % args.moe.num_groups:
            problems.append(f"n_group={args.moe.num_groups} and ep={layout.ep}: one must divide the other")
    elif layout.ep > 1:
        problems.append(f"ep={layout.ep} needs a MoE model ({args.architecture} is dense)")
    if problems:
        raise ConfigError(f"{source}: parallel layout {layout.describe()} does not fit the model: " + "; ".join(problems))


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up to a multiple of divisible_by * 8 (divisible_by * tp beyond tp = 8).

    Megatron pads to divisible_by * tp, which makes the embedding's global shape depend on TP, so a
    torch_dist checkpoint saved at one TP would not load at another. Padding for tp = 8 serves every
    tp <= 8 (attention TP cannot exceed the KV heads: 4 or 8 for the models here) with one shape.
    """
    multiple = divisible_by * max(8, tp) if tp <= 8 else divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def uses_transformer_engine(options: RuntimeOptions) -> bool:
    if options.use_transformer_engine is not None:
        if options.use_transformer_engine and not _te_importable():
            raise ConfigError("use_transformer_engine=True but transformer_engine is not importable")
        return options.use_transformer_engine
    return torch.cuda.is_available() and _te_importable()


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False


def transformer_config(args: ModelArgs, layout: ParallelLayout, options: RuntimeOptions = RuntimeOptions()):
    """The TransformerConfig for this model at this layout (checks the layout first)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_layout(args, layout)
    if options.routing_replay and options.recompute_granularity:
        # a recomputed forward would route afresh: Megatron's REPLAY_BACKWARD is not wired here
        raise ConfigError(f"routing replay with recompute_granularity={options.recompute_granularity!r} is not "
                          "supported: turn one of them off")
    on_gpu = torch.cuda.is_available()
    te = uses_transformer_engine(options)
    bf16 = options.params_dtype == torch.bfloat16
    fp16 = options.params_dtype == torch.float16
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_kv_heads,
        kv_channels=args.head_dim,
        ffn_hidden_size=args.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_residual_connection_post_layernorm=False,
        params_dtype=options.params_dtype,
        pipeline_dtype=options.params_dtype,
        bf16=bf16,
        fp16=fp16,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sp,
        use_cpu_initialization=not on_gpu,
        perform_initialization=options.init_weights,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,  # RoPE comes from position ids ([s, b, 1, d]), which the fused kernel rejects
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # gloo on one host: overlapping batched p2p with the same peer both ways gives wrong losses (VPP)
        batch_p2p_comm=on_gpu,
        deallocate_pipeline_outputs=True,
        # recompute_granularity is applied by models/recompute.py (Megatron's cannot carry our masks)
    )
    if args.moe:
        moe = args.moe
        if options.moe_experts not in ("auto", "grouped", "sequential"):
            raise ConfigError(f"model.experts={options.moe_experts!r}: expected auto, grouped or sequential")
        grouped = options.moe_experts != "sequential"
        aux = options.moe_aux_loss_coef if options.moe_aux_loss_coef is not None else 0.0
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_layer_freq=list(moe.layer_pattern),
            moe_router_score_function=moe.score_function,
            # softmax: top-k on the logits then softmax over the k == softmax, top-k, renormalise
            moe_router_pre_softmax=not moe.norm_topk_prob if moe.score_function == "softmax" else False,
            moe_router_dtype="fp32",
            moe_router_topk_scaling_factor=moe.scaling_factor,
            moe_router_num_groups=moe.num_groups,
            moe_router_group_topk=moe.group_topk,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_router_bias_update_rate=options.expert_bias_update_rate,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
            moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
            moe_aux_loss_coeff=aux,
            moe_token_dispatcher_type=layout.moe_dispatcher,
            moe_grouped_gemm=grouped,
            moe_permute_fusion=False,
            moe_router_fusion=False,
            moe_enable_routing_replay=options.routing_replay,
        )
    config = TransformerConfig(**kwargs)
    # dare_mega's own settings travel with the config to the modules its layer spec builds.
    config.dare_attention_backend = options.attention_backend
    config.dare_use_te = te
    return config
