"""config.json -> ModelArgs for the toy Qwen3-layout family."""

from __future__ import annotations

from dare_mega.errors import ConfigError
from dare_mega.models.args import DiffusionArgs, ModelArgs, read_attention, read_eos_ids, read_mask_token

ARCH = "ToyQwen3ForCausalLM"
MASK_TOKEN_ID = 259  # <|MASK|> of the tiny tokenizer: 256 bytes, then the specials in order
BLOCK_SIZE = 4


def args_from_hf(cfg: dict, source: str = "config.json", mask_token_id: int | None = None,
                 block_size: int | None = None) -> ModelArgs:
    if (cfg.get("architectures") or [None])[0] != ARCH:
        raise ConfigError(f"{source}: architecture {cfg.get('architectures')} is not {ARCH}")
    for key in ("attention_bias", "rope_scaling", "use_sliding_window"):
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not part of the toy Qwen3 layout")
    sizes = read_attention(cfg, source)
    if sizes["tie_word_embeddings"]:
        raise ConfigError(f"{source}: tie_word_embeddings=true is not part of the toy Qwen3 layout")
    eos = read_eos_ids(cfg)
    return ModelArgs(
        family="toy_qwen3",
        architecture=ARCH,
        **sizes,
        rope_theta=float(cfg.get("rope_theta", 1e6)),
        qk_norm=True,
        diffusion=DiffusionArgs(
            mask_token_id=read_mask_token(cfg, source, mask_token_id, MASK_TOKEN_ID, sizes["vocab_size"]),
            block_size=block_size or cfg.get("block_size") or BLOCK_SIZE,
            shifted_logits=False,
            pad_token_id=cfg.get("pad_token_id", eos[0] if eos else 0),
            eos_token_ids=eos,
        ),
    )
