"""LLaDA-MoE masked diffusion models (LLaDAMoEModelLM: LLaDA-MoE-7B-A1B-Base / -Instruct; OLMoE layout)."""

from dare_mega.models.family import ModelFamily, register
from dare_mega.models.llada_moe import config
from dare_mega.models.llada_moe.mapping import llada_moe_mapping

# the tiny test tokenizer (checkpoint/tiny.py): byte tokens, then these specials (ids as in the tiny preset).
# LLaDA-MoE uses the Ling tokenizer of LLaDA2 (<|endoftext|> 156892 is config.json's eos_token_id, <|mask|>
# 156895 the mask id of the model card's generate()); the chat format here is the Ling turn format of LLaDA2's
# published template (LLaDA-MoE's own tokenizer_config.json was not available to check it against)
LING_CHAT = (
    "{{ '<role>SYSTEM</role>' }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'] + '<|role_end|>' }}{% else %}{{ '<role>' + ('HUMAN' if message['role'] == 'user' "
    "else message['role'] | upper) + '</role>' + message['content'] + '<|role_end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)
TINY_TOKENIZER = dict(specials=["<|endoftext|>", "<|startoftext|>", "<|role_end|>", "<|mask|>"],
                      eos="<|endoftext|>", pad="<|endoftext|>", mask="<|mask|>", chat=LING_CHAT,
                      generation_eos=None)


def _reference(directory):
    from dare_mega.models.llada_moe.reference import reference_model

    return reference_model(directory)


def _reference_named_tensors(model, grads=False):
    from dare_mega.models.llada_moe.reference import named_tensors

    return named_tensors(model, grads)


LLADA_MOE = register(
    ModelFamily(
        name="llada_moe",
        architectures=(config.ARCH,),
        args_from_hf=config.args_from_hf,
        mapping=llada_moe_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        reference_named_tensors=_reference_named_tensors,
        reference_features=frozenset({"qk_norm", "partial_rope", "tied_embeddings", "full_attention",
                                      "router_softmax", "shared_expert"}),
        sft_objective="masked_diffusion",
        tiny_presets=("tiny-llada-moe",),
        tiny_tokenizer=TINY_TOKENIZER,
        # LLaDA's generate() (semi-autoregressive, low-confidence remasking, temperature 0), which LLaDA-MoE's
        # model card uses with block length 32
        decoding={"policy": "low_confidence_static", "temperature": 0.0, "confidence": "raw"},
        sglang_dllm=None,  # SGLang 0.5.23 does not serve LLaDAMoEModelLM as a diffusion LLM
    )
)
