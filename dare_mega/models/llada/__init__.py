"""LLaDA masked diffusion models (LLaDAModelLM: LLaDA-8B-Base / -Instruct, LLaDA-1.5)."""

from dare_mega.models.family import ModelFamily, register
from dare_mega.models.llada import config
from dare_mega.models.llada.mapping import llada_mapping

# the tiny test tokenizer (checkpoint/tiny.py): byte tokens, then these specials, LLaDA-8B-Instruct's chat
# format (its bos is <|startoftext|>); its generation_config.json names <|endoftext|>, and an Instruct turn ends
# with <|eot_id|>
LLADA_CHAT = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ '<|startoftext|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TINY_TOKENIZER = dict(specials=["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>", "<|mdm_mask|>"],
                      eos="<|endoftext|>", pad="<|endoftext|>", mask="<|mdm_mask|>", chat=LLADA_CHAT,
                      generation_eos=["<|endoftext|>", "<|eot_id|>"])


def _reference(directory):
    from dare_mega.models.llada.reference import reference_model

    return reference_model(directory)


LLADA = register(
    ModelFamily(
        name="llada",
        architectures=(config.ARCH,),
        args_from_hf=config.args_from_hf,
        mapping=llada_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        reference_features=frozenset({"full_attention", "tied_embeddings"}),
        sft_objective="masked_diffusion",
        tiny_presets=("tiny-llada",),
        tiny_tokenizer=TINY_TOKENIZER,
        # LLaDA generate() in its examples: block length 32, one token per step (steps = generation length),
        # low-confidence remasking, temperature 0
        decoding={"policy": "low_confidence_static", "temperature": 0.0, "confidence": "raw"},
        sglang_dllm=None,
    )
)
