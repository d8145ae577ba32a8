"""Dream masked diffusion models (DreamModel: Dream-v0-Base-7B, Dream-v0-Instruct-7B; Qwen2 layout)."""

from dare_mega.models.dream import config
from dare_mega.models.dream.mapping import dream_mapping
from dare_mega.models.family import ModelFamily, register

# the tiny test tokenizer (checkpoint/tiny.py): byte tokens, then these specials (ids as in the tiny preset),
# Qwen's chat format with Dream-Instruct's default system turn; an Instruct answer ends with <|im_end|>
DREAM_CHAT = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_TOKENIZER = dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
                      eos="<|endoftext|>", pad="<|endoftext|>", mask="<|mask|>", chat=DREAM_CHAT,
                      generation_eos=["<|im_end|>", "<|endoftext|>"])


def _reference(directory):
    from dare_mega.models.dream.reference import reference_model

    return reference_model(directory)


DREAM = register(
    ModelFamily(
        name="dream",
        architectures=(config.ARCH,),
        args_from_hf=config.args_from_hf,
        mapping=dream_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        # transformers' Qwen2 with the shift of models/ops.py (any attention mask, tied or untied head)
        reference_features=frozenset({"qkv_bias", "shifted_logits", "full_attention", "tied_embeddings"}),
        sft_objective="masked_diffusion",
        tiny_presets=("tiny-dream",),
        tiny_tokenizer=TINY_TOKENIZER,
        # Dream's README: steps = max_new_tokens (one token per step), temperature 0.2, top-p 0.95, entropy
        # confidence; dare_mega's nearest policy until Dream's algorithms are in the decoder
        decoding={"policy": "low_confidence_static", "temperature": 0.0},
        sglang_dllm=None,  # SGLang 0.5.23 does not serve DreamModel as a diffusion LLM
    )
)
