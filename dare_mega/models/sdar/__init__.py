"""SDAR block-diffusion models: dense (SDARForCausalLM, Qwen3 layout) and MoE (SDARMoeForCausalLM, Qwen3-MoE)."""

from dare_mega.models.family import ModelFamily, register
from dare_mega.models.sdar import config
from dare_mega.models.sdar.mapping import sdar_mapping

# the tiny test tokenizer (checkpoint/tiny.py): byte tokens, then these specials (ids as in the tiny presets),
# Qwen's chat format, and the stop tokens of the published generation_config.json
QWEN_CHAT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_TOKENIZER = dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>", "<think>", "</think>"],
                      eos="<|im_end|>", pad="<|endoftext|>", mask="<|MASK|>", chat=QWEN_CHAT,
                      generation_eos=["<|im_end|>", "<|endoftext|>"])


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
        # transformers' Qwen3 / Qwen3-MoE (any attention mask, tied or untied output layer)
        reference_features=frozenset({"qk_norm", "tied_embeddings", "full_attention", "router_softmax"}),
        sft_objective="sdar_block",
        tiny_presets=("tiny-sdar", "tiny-sdar-moe"),
        tiny_tokenizer=TINY_TOKENIZER,
        # SDAR README / JetEngine: dynamic low-confidence unmasking at threshold 0.9, greedy
        decoding={"policy": "low_confidence_dynamic", "threshold": 0.9, "temperature": 0.0},
        sglang_dllm={"block_size": 4, "mask_id": 151669},
    )
)
