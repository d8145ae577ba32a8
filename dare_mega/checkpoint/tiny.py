"""Random HF checkpoints in the exact published layout, from a preset: config.json, safetensors, tokenizer.

The tensor names and shapes come from the family's mapping table (the same table that loads them), so a
tiny checkpoint has every tensor a real one of that family has. The tokenizer is a byte-level BPE with no
merges (every byte is a token) plus the family's special tokens, saved in HF format.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch

from dare_mega.checkpoint.safetensors_io import write_hf_checkpoint
from dare_mega.models.builder import args_from_config, mapping_for
from dare_mega.models.presets import load_preset

# Specials of the tiny tokenizer, right after the 256 byte tokens (ids as in the tiny presets).
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _init_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights: near 1, but not 1, so that a mis-mapped norm shows in the logits
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    std = 0.2 if name.endswith("mlp.gate.weight") else 1.0 / math.sqrt(shape[-1])
    return std * torch.randn(shape, generator=generator)


def save_tiny_tokenizer(directory: str, specials: list[str] = TINY_SPECIALS) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {ch: i for i, ch in enumerate(sorted(byte_vocab, key=lambda c: ord(c)))}
    tokenizer = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<|MASK|>",
        additional_special_tokens=[t for t in specials if t not in ("<|endoftext|>", "<|im_end|>", "<|MASK|>")],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def make_tiny_checkpoint(out_dir: str, preset: str = "tiny-sdar", seed: int = 0,
                         max_shard_bytes: int = 2**20, dtype: torch.dtype = torch.float32) -> str:
    """Write a random checkpoint of `preset` to `out_dir` (sharded with an index when large enough)."""
    cfg = load_preset(preset)
    args = args_from_config(cfg, preset)
    table = mapping_for(args)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: _init_tensor(name, shape, generator).to(dtype) for name, shape in sorted(table.expected_hf().items())
    }
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tiny_tokenizer(tok_dir)
        extra = {}
        for file in os.listdir(tok_dir):
            with open(os.path.join(tok_dir, file), "rb") as f:
                extra[file] = f.read()
    # as published: generation stops on <|im_end|> and <|endoftext|>; pads with <|endoftext|>
    im_end = 256 + TINY_SPECIALS.index("<|im_end|>")
    generation = {"eos_token_id": [im_end, args.diffusion.pad_token_id], "pad_token_id": args.diffusion.pad_token_id}
    extra["generation_config.json"] = json.dumps(generation, indent=2).encode()
    write_hf_checkpoint(out_dir, tensors, config=cfg, max_shard_bytes=max_shard_bytes, extra_files=extra)
    return out_dir
