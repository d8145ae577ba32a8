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

from dare_mega.errors import DareMegaError
from dare_mega.models.builder import args_from_config, mapping_for
from dare_mega.models.family import family_for
from dare_mega.models.presets import load_preset
from dare_mega.storage.safetensors_io import LazyTensors, write_hf_checkpoint


def _init_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith(".bias"):  # q / k / v biases: small, not zero, so that a mis-mapped one shows
        return 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1:  # norm weights: near 1, but not 1, so that a mis-mapped norm shows in the logits
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    std = 0.2 if name.endswith("mlp.gate.weight") else 1.0 / math.sqrt(shape[-1])
    return std * torch.randn(shape, generator=generator)


def save_tiny_tokenizer(directory: str, spec: dict) -> None:
    """A byte-level tokenizer: the 256 byte tokens, then the family's special tokens (`ModelFamily.tiny_tokenizer`:
    specials, eos, pad, mask, chat template, generation_eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = spec["specials"]
    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {ch: i for i, ch in enumerate(sorted(byte_vocab, key=lambda c: ord(c)))}
    tokenizer = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    named = (spec["eos"], spec["pad"], spec["mask"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        mask_token=spec["mask"],
        additional_special_tokens=[t for t in specials if t not in named],
    )
    fast.chat_template = spec["chat"]
    fast.save_pretrained(directory)


def make_tiny_checkpoint(out_dir: str, preset: str | dict = "tiny-sdar", seed: int = 0,
                         max_shard_bytes: int = 2**20, dtype: torch.dtype = torch.float32) -> str:
    """Write a random checkpoint of `preset` (a preset name or an HF config dict) to `out_dir`.

    Sharded with an index when larger than max_shard_bytes; tensors are generated one at a time while they
    are written, so checkpoints larger than memory can be made (benchmarks/convert.py).
    """
    cfg = load_preset(preset) if isinstance(preset, str) else dict(preset)
    if dtype != torch.float32:
        cfg = {**cfg, "torch_dtype": str(dtype).replace("torch.", "")}
        cfg.pop("dtype", None)
    args = args_from_config(cfg, preset if isinstance(preset, str) else "config")
    table = mapping_for(args)
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(sorted(table.expected_hf().items()))

    def dtype_of(name):  # as published: weights in `dtype`, the router's expert_bias in float32
        return torch.float32 if name.endswith("expert_bias") else dtype

    tensors = LazyTensors(
        [(name, dtype_of(name), shape) for name, shape in shapes.items()],
        lambda name: _init_tensor(name, shapes[name], generator).to(dtype_of(name)),
    )
    spec = family_for(args.architecture).tiny_tokenizer
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tiny_tokenizer(tok_dir, spec)
        extra = {}
        for file in os.listdir(tok_dir):
            with open(os.path.join(tok_dir, file), "rb") as f:
                extra[file] = f.read()
    # as published: SDAR stops on <|im_end|> and <|endoftext|>; LLaDA2's file names only the pad
    generation = {"pad_token_id": args.diffusion.pad_token_id}
    if spec["generation_eos"]:
        generation["eos_token_id"] = [256 + spec["specials"].index(t) for t in spec["generation_eos"]]
    extra["generation_config.json"] = json.dumps(generation, indent=2).encode()
    write_hf_checkpoint(out_dir, tensors, config=cfg, max_shard_bytes=max_shard_bytes, extra_files=extra)
    return out_dir


def cache_dir() -> str:
    """Where made files are kept between runs ($DARE_MEGA_CACHE, default ~/.cache/dare_mega)."""
    return os.environ.get("DARE_MEGA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dare_mega"))


def cached_tiny_checkpoint(preset: str, seed: int = 0) -> str:
    """The tiny checkpoint of `preset`, made once and reused (written atomically)."""
    import hashlib

    from dare_mega.models.presets import preset_file

    # keyed by the preset's content, so that an edited preset never reuses a stale checkpoint
    digest = hashlib.sha256(preset_file(preset).read_bytes()).hexdigest()[:10]
    path = os.path.join(cache_dir(), "checkpoints", f"{preset}-seed{seed}-{digest}")
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            make_tiny_checkpoint(path, preset=preset, seed=seed)
        except (OSError, DareMegaError):  # another process (a torchrun rank) made it first
            if not os.path.exists(os.path.join(path, "config.json")):
                raise
    return path
