"""Core attention for block-diffusion models, swapped into Megatron's SelfAttention through the layer spec.

Megatron hands the core attention query [sq, b, heads/tp, d], key and value [sk, b, groups/tp, d] (after RoPE
and q/k norms, with the sequence gathered when sequence parallelism is on) and the `attention_mask` object
that GPTModel.forward received. Here that object is a `BlockDiffusionMask` (dare_mega/diffusion/masks.py),
so the mask is described per token and each backend builds what it needs from it:

- "flex": FlexAttention with the mask as a mask_mod and a BlockMask (block-sparse: fully masked 128x128
  tiles are skipped, no [s, s] tensor). Compiled with torch.compile on GPUs; eager elsewhere (slow, but the
  same arithmetic, which is what the parity test checks).
- "sdpa": torch's scaled_dot_product_attention with the dense boolean mask. The CPU path.
- "auto": flex when CUDA is present, else sdpa.

A dense boolean tensor [b, 1, sq, sk] (True = may attend) is accepted as well, for callers that already
have one (tools/check_logits.py compares against other implementations that way), and a `CachedBlocks`
(dare_mega/diffusion/kv_cache.py) for a rollout forward with the block KV cache: the new tokens attend to
their rows' cached keys and to each other, and write theirs (the native engine's rule, the same function).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from dare_mega.diffusion.kv_cache import CachedBlocks
from dare_mega.diffusion.masks import BlockDiffusionMask

BACKENDS = ("auto", "flex", "sdpa")
_compiled_flex = None


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {BACKENDS}")
    if name == "auto":
        return "flex" if torch.cuda.is_available() else "sdpa"
    return name


def _eager_flex(*args, **kwargs):
    """FlexAttention without compilation: the unfused reference arithmetic (CPU checks only)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(*args, **kwargs)


def _flex_attention():
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return _eager_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def attend(q, k, v, mask, scale: float, backend: str, dropout_p: float = 0.0):
    """Attention on [b, heads, s, d] tensors (k, v may have fewer heads: grouped-query attention)."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockDiffusionMask):
        if backend == "flex":
            if dropout_p:
                raise ValueError("attention dropout is not supported by the flex backend")
            return _flex_attention()(q, k, v, block_mask=mask.flex_block_mask(), scale=scale, enable_gqa=gqa)
        allowed = mask.dense()
    elif mask is None:
        allowed = None
    else:
        allowed = mask.bool()
        if backend == "flex":
            dense = allowed

            def mask_mod(b, h, qi, ki):
                return dense[b, 0, qi, ki]

            from torch.nn.attention.flex_attention import create_block_mask

            block_mask = create_block_mask(mask_mod, dense.shape[0], None, q.shape[2], k.shape[2], device=q.device)
            return _flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )


class BlockDiffusionAttention(MegatronModule):
    """Drop-in for Megatron's DotProductAttention that takes a block-diffusion mask (see module docstring)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "context_parallel_size > 1 is not supported with block-diffusion attention (the block "
                "grid needs whole sequences on a rank); use sequence parallelism instead"
            )
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = layer_number
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend = resolve_backend(backend)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None:
            raise ValueError(
                "packed_seq_params (THD) is not used by block-diffusion attention: packed samples are "
                "kept apart by the mask's document ids"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by block-diffusion attention")
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if isinstance(attention_mask, CachedBlocks):  # a decoding forward with the block KV cache
            out = attention_mask.attend(self.layer_number, q, k, v, self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend(q, k, v, attention_mask, self.softmax_scale, self.backend, dropout_p)
        else:
            out = attend(q, k, v, attention_mask, self.softmax_scale, self.backend)
        # [b, h, sq, d] -> [sq, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)
