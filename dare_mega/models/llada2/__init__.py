"""LLaDA2.x block-diffusion MoE models (LLaDA2MoeModelLM, BailingMoeV2 layout)."""

from dare_mega.models.family import ModelFamily, register
from dare_mega.models.llada2 import config
from dare_mega.models.llada2.mapping import llada2_mapping

# the tiny test tokenizer (checkpoint/tiny.py): byte tokens, then these specials, LLaDA2's chat format; its
# published generation_config.json names only the pad
LLADA2_CHAT = (
    "{{ '<role>SYSTEM</role>' }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'] + '<|role_end|>' }}{% else %}{{ '<role>' + ('HUMAN' if message['role'] == 'user' "
    "else message['role'] | upper) + '</role>' + message['content'] + '<|role_end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)
TINY_TOKENIZER = dict(specials=["<|endoftext|>", "<|startoftext|>", "<|role_end|>", "<|mask|>"],
                      eos="<|endoftext|>", pad="<|endoftext|>", mask="<|mask|>", chat=LLADA2_CHAT,
                      generation_eos=None)


def _reference(directory):
    from dare_mega.models.llada2.reference import reference_model

    return reference_model(directory)


LLADA2 = register(
    ModelFamily(
        name="llada2",
        architectures=(config.ARCH,),
        args_from_hf=config.args_from_hf,
        mapping=llada2_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        reference_features=frozenset({"qk_norm", "partial_rope", "full_attention", "router_sigmoid_grouped",
                                      "router_sigmoid", "expert_bias", "shared_expert"}),
        sft_objective="llada2_block",
        tiny_presets=("tiny-llada2-moe",),
        tiny_tokenizer=TINY_TOKENIZER,
        # LLaDA2 generate(): temperature 0, steps 32 per block, threshold 0.95
        decoding={"policy": "low_confidence_dynamic", "threshold": 0.95, "steps": 32, "temperature": 0.0},
        sglang_dllm={"block_size": 32, "mask_id": 156895},
    )
)
