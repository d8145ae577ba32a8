"""A toy family written as a researcher would add one: this folder only (config, mapping, preset, reference).

Block diffusion on a plain Qwen3 layout (`ToyQwen3ForCausalLM`: q/k-norm, GQA, SwiGLU, untied output layer).
`DARE_MEGA_FAMILIES=toy_qwen3` (with this folder's parent on PYTHONPATH) makes every dare_mega entry point
import it; tests/test_families.py makes a tiny checkpoint from `tiny.json` and runs parity at TP=2 against
transformers without any other file knowing the family's name.
"""

from dare_mega.models.family import ModelFamily, register

from . import config
from .mapping import toy_mapping

CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _reference(directory):
    from .reference import reference_model

    return reference_model(directory)


def _named_tensors(model, grads=False):
    return {name: (p.grad if grads else p.detach()) for name, p in model.named_parameters()
            if not grads or p.grad is not None}


TOY_QWEN3 = register(
    ModelFamily(
        name="toy_qwen3",
        architectures=(config.ARCH,),
        args_from_hf=config.args_from_hf,
        mapping=toy_mapping,
        default_mask_token_id=config.MASK_TOKEN_ID,
        default_block_size=config.BLOCK_SIZE,
        reference=_reference,
        reference_named_tensors=_named_tensors,
        reference_features=frozenset({"qk_norm", "full_attention"}),
        sft_objective="sdar_block",
        tiny_tokenizer=dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"], eos="<|im_end|>",
                            pad="<|endoftext|>", mask="<|MASK|>", chat=CHAT, generation_eos=["<|im_end|>"]),
        decoding={"policy": "low_confidence_dynamic", "threshold": 0.9, "temperature": 0.0},
    )
)
