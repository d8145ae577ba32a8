"""SDAR block-diffusion models: dense (SDARForCausalLM, Qwen3 layout) and MoE (SDARMoeForCausalLM, Qwen3-MoE)."""

from dare_mega.models.family import ModelFamily, register
from dare_mega.models.sdar import config
from dare_mega.models.sdar.mapping import sdar_mapping


def _reference(directory):
    from dare_mega.models.sdar.hf_reference import hf_reference_model

    return hf_reference_model(directory)


def _reference_named_tensors(model, grads=False):
    from dare_mega.models.sdar.hf_reference import hf_named_tensors

    return hf_named_tensors(model, grads)


SDAR = register(
    ModelFamily(
        name="sdar",
        architectures=(config.DENSE_ARCH, config.MOE_ARCH),
        args_from_hf=config.args_from_hf,
        mapping=sdar_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        reference_named_tensors=_reference_named_tensors,
        # SDAR README / JetEngine: dynamic low-confidence unmasking at threshold 0.9, greedy
        decoding={"policy": "low_confidence_dynamic", "threshold": 0.9, "temperature": 0.0},
    )
)
