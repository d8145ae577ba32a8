"""LLaDA2.x block-diffusion MoE models (LLaDA2MoeModelLM, BailingMoeV2 layout)."""

from dare_mega.models.family import ModelFamily, register
from dare_mega.models.llada2 import config
from dare_mega.models.llada2.mapping import llada2_mapping


def _reference(directory):
    from dare_mega.models.llada2.reference import reference_model

    return reference_model(directory)


def _reference_named_tensors(model, grads=False):
    from dare_mega.models.llada2.reference import named_tensors

    return named_tensors(model, grads)


LLADA2 = register(
    ModelFamily(
        name="llada2",
        architectures=(config.ARCH,),
        args_from_hf=config.args_from_hf,
        mapping=llada2_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        reference_named_tensors=_reference_named_tensors,
        # LLaDA2 generate(): temperature 0, steps 32 per block, threshold 0.95
        decoding={"policy": "low_confidence_dynamic", "threshold": 0.95, "steps": 32, "temperature": 0.0},
    )
)
