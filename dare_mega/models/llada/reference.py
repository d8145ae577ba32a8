"""A plain single-process PyTorch reference of the HF LLaDA model (LLaDAModelLM, OLMo's `llama` block), with the
checkpoint's own parameter names (model.transformer.*).

transformers has no class for it (the published checkpoint ships its own modeling_llada.py), so this module
re-states that code's semantics from the config, independently of the Megatron code (the arithmetic of
models/ops.py, which tests/test_ops.py checks against literal transcriptions of the HF code): per block
x = x + attn_out(attention(attn_norm(x))), x = x + ff_out(silu(ff_proj(h)) * up_proj(h)) with h = ff_norm(x);
q / k / v projections without biases, rotate-half RoPE at rope_theta on the whole head, key / value heads
repeated for the query heads, softmax(q k^T / sqrt(head_dim) + mask) v; the final RMSNorm ln_f and the output
layer ff_out (wte with weight_tying). The published model attends bidirectionally over positions 0..s-1; this
reference takes the positions and the mask as arguments (packed documents, each from position 0), which is the
published computation for one document with the full mask.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from dare_mega.models import ops
from dare_mega.models.builder import read_hf_config
from dare_mega.models.ops import RMSNorm
from dare_mega.storage.safetensors_io import CheckpointReader


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, eps = cfg["d_model"], float(cfg.get("rms_norm_eps", 1e-5))
        self.heads = cfg["n_heads"]
        self.kv_heads = cfg.get("n_kv_heads") or self.heads
        self.head_dim = hidden // self.heads
        inner = cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * hidden
        self.attn_norm = RMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.ff_norm = RMSNorm(hidden, eps)
        self.ff_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.ff_out = nn.Linear(inner, hidden, bias=False)

    def attention(self, x, additive_mask, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + additive_mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return self.attn_out((probs @ v).transpose(1, 2).reshape(b, s, -1))

    def forward(self, x, mask, cos, sin):
        x = x + self.attention(self.attn_norm(x), mask, cos, sin)
        h = self.ff_norm(x)
        return x + self.ff_out(ops.swiglu(self.ff_proj(h), self.up_proj(h)))


class Transformer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        rows = cfg.get("embedding_size") or cfg["vocab_size"]
        self.wte = nn.Embedding(rows, cfg["d_model"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.ln_f = RMSNorm(cfg["d_model"], float(cfg.get("rms_norm_eps", 1e-5)))
        if not cfg.get("weight_tying"):
            self.ff_out = nn.Linear(cfg["d_model"], rows, bias=False)


class Backbone(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.transformer = Transformer(cfg)


class LLaDAReference(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        head_dim = cfg["d_model"] // cfg["n_heads"]
        self.register_buffer("inv_freq", ops.rope_inverse_frequencies(head_dim, float(cfg.get("rope_theta", 1e4))),
                             persistent=False)

    def forward(self, input_ids, position_ids, attention_mask):
        """attention_mask: [b, 1, s, s], additive (0 / -inf-like) or boolean (True = may attend)."""
        t = self.model.transformer
        if attention_mask.dtype == torch.bool:
            dtype = t.wte.weight.dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype).masked_fill(
                ~attention_mask, torch.finfo(dtype).min)
        x = t.wte(input_ids)
        cos, sin = ops.rope_tables(position_ids, self.inv_freq, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, head_dim]: every head alike
        for block in t.blocks:
            x = block(x, attention_mask.to(x.dtype), cos, sin)
        head = t.wte.weight if self.cfg.get("weight_tying") else t.ff_out.weight
        return SimpleNamespace(logits=F.linear(t.ln_f(x), head).float())


def reference_model(directory: str, dtype: torch.dtype = torch.float32) -> LLaDAReference:
    cfg, _ = read_hf_config(directory)
    with torch.device("meta"):
        model = LLaDAReference(cfg)
    reader = CheckpointReader(directory)
    model.load_state_dict({name: reader.get(name).to(dtype) for name in reader.names()}, strict=True, assign=True)
    head_dim = cfg["d_model"] // cfg["n_heads"]
    model.inv_freq = ops.rope_inverse_frequencies(head_dim, float(cfg.get("rope_theta", 1e4)))  # built on meta
    return model.eval()

