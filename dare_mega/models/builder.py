"""Build the Megatron model of an HF checkpoint at a parallel layout.

    args = load_model_args(hf_dir)                 # config.json -> ModelArgs (checked)
    chunks = build_model(args, layout, options)    # this rank's model chunks (several with VPP)
    load_hf_weights(chunks, args, hf_dir, mapping_for(args))  # dare_mega/models/hf_loader.py
"""

from __future__ import annotations

import json
import os

import torch

from dare_mega.errors import ConfigError
from dare_mega.models import ops
from dare_mega.models.args import ModelArgs
from dare_mega.models.family import family_for, require_features
from dare_mega.models.gpt import DiffusionGPTModel
from dare_mega.models.hf_loader import check_hf_checkpoint, load_hf_weights
from dare_mega.models.recompute import apply_recompute
from dare_mega.models.spec import decoder_block_spec
from dare_mega.models.transformer_config import (
    RuntimeOptions,
    check_layout,
    padded_vocab_size,
    transformer_config,
)
from dare_mega.parallel.layout import ParallelLayout

# what the Megatron model built here implements (models/family.py: FEATURES); the attention takes any mask
MEGATRON_FEATURES = frozenset({"qk_norm", "qkv_bias", "shifted_logits", "partial_rope", "tied_embeddings",
                               "full_attention", "router_softmax", "router_sigmoid", "router_sigmoid_grouped", "expert_bias", "shared_expert"})


def read_hf_config(path: str) -> tuple[dict, str]:
    """(config dict, file path) from a checkpoint directory or a config.json path."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"{file}: no such file (expected an HF config.json)")
    try:
        with open(file) as f:
            return json.load(f), file
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e


def args_from_config(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                     block_size: int | None = None) -> ModelArgs:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConfigError(f"{source}: required key 'architectures' is missing")
    family = family_for(archs[0], source)
    return family.args_from_hf(cfg, source, mask_token_id=mask_token_id, block_size=block_size)


def load_model_args(path: str, mask_token_id: int | None = None, block_size: int | None = None) -> ModelArgs:
    cfg, source = read_hf_config(path)
    generation = os.path.join(os.path.dirname(source), "generation_config.json")
    if os.path.exists(generation):  # its eos list is what generation stops on
        try:
            with open(generation) as f:
                eos = json.load(f).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{generation}: not valid JSON ({e})") from e
        if eos is not None:
            cfg = {**cfg, "generation_eos_token_id": eos}
    return args_from_config(cfg, source, mask_token_id=mask_token_id, block_size=block_size)


def mapping_for(args: ModelArgs):
    return family_for(args.architecture).mapping(args)


def build_model(args: ModelArgs, layout: ParallelLayout, options: RuntimeOptions = RuntimeOptions(),
                source: str = "config.json") -> list[DiffusionGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage). Model-parallel groups must exist."""
    from megatron.core import parallel_state

    check_layout(args, layout, source)
    require_features(args, MEGATRON_FEATURES, "the Megatron model (models/builder.py)")
    if parallel_state.get_tensor_model_parallel_world_size() != layout.tp:
        raise ConfigError(
            f"build_model: layout says tp={layout.tp} but the initialised groups have "
            f"tp={parallel_state.get_tensor_model_parallel_world_size()} (call init_model_parallel(layout))"
        )
    if options.params_dtype == torch.float32:
        ops.exact_float32_matmuls()
    config = transformer_config(args, layout, options)
    vocab = padded_vocab_size(args.vocab_size, layout.tp, options.make_vocab_size_divisible_by)
    layer_is_moe = [args.layer_is_moe(i) for i in range(args.num_layers)]
    chunks = []
    for vp_stage in range(layout.num_chunks):
        vp = vp_stage if layout.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = DiffusionGPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, layer_is_moe, vp_stage=vp),
            vocab_size=vocab,
            max_sequence_length=args.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=args.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=args.rotary_percent,
            rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
            vp_stage=vp,
            shifted_logits=args.diffusion is not None and args.diffusion.shifted_logits,
        )
        if torch.cuda.is_available() and not any(p.is_meta for p in model.parameters()):
            model.cuda(torch.cuda.current_device())  # a model built on meta (save_from_hf) only describes shards
        model.dare_args = args  # the architecture travels with the model (mapping, export, weight sync)
        apply_recompute(model, options.recompute_granularity)
        chunks.append(model)
    return chunks


def build_from_hf(hf_dir: str, layout: ParallelLayout, options: RuntimeOptions = RuntimeOptions(),
                  mask_token_id: int | None = None, block_size: int | None = None):
    """Check config, layout and checkpoint (headers only), then build this rank's chunks and load them.

    Every check runs before any model is built, so bad input costs nothing: an unknown architecture or a
    malformed config names the key and file, a layout that does not divide the model names the sizes, and a
    missing or mis-shaped tensor names the tensor, the file and both shapes. Returns (chunks, args).
    """
    args = load_model_args(hf_dir, mask_token_id=mask_token_id, block_size=block_size)
    check_layout(args, layout, source=os.path.join(hf_dir, "config.json"))
    table = mapping_for(args)
    reader = check_hf_checkpoint(args, hf_dir, table)
    chunks = build_model(args, layout, options, source=hf_dir)
    load_hf_weights(chunks, args, hf_dir, table=table, reader=reader)
    return chunks, args
