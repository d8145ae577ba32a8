"""A plain single-process PyTorch reference of the HF LLaDA2 model (LLaDA2MoeModelLM, BailingMoeV2 layout).

transformers has no class for it, so this module re-states the HF modeling semantics from the config, with
the checkpoint's own parameter names, independently of the Megatron code (the arithmetic of models/ops.py, which
tests/test_ops.py checks against literal transcriptions of the HF code): fused [Q_all ; K_all ; V_all]
projection, RMSNorm on q and k before a partial rotary embedding (the first head_dim * partial_rotary_factor
dims, rotate-half), SwiGLU MLPs, and MoE layers with a sigmoid router (fp32 logits; selection on
score + expert_bias restricted to the best `topk_group` of `n_group` groups, each scored by its top-2
(models/llada2/config.py refuses configs where Megatron's top num_experts_per_tok / topk_group would differ);
weights = the unbiased scores of the chosen experts, renormalised, times routed_scaling_factor) plus one
shared expert. Used by tools/check_logits.py and the tests; `routing` records the experts each MoE layer chose.
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


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Gate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.num_experts = cfg["num_experts"]
        self.topk = cfg["num_experts_per_tok"]
        self.n_group = cfg.get("n_group") or 1
        self.topk_group = cfg.get("topk_group") or self.n_group
        self.scaling = float(cfg.get("routed_scaling_factor", 1.0))
        self.weight = nn.Parameter(torch.zeros(self.num_experts, cfg["hidden_size"]))
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        return ops.route(logits, self.topk, "sigmoid", expert_bias=self.expert_bias, num_groups=self.n_group,
                         group_topk=self.topk_group, scaling_factor=self.scaling)


class MoE(nn.Module):
    def __init__(self, cfg: dict, trace: list):
        super().__init__()
        hidden, inner = cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(hidden, inner) for _ in range(cfg["num_experts"]))
        shared = cfg.get("num_shared_experts") or 0
        self.shared_experts = MLP(hidden, inner * shared) if shared else None
        self._trace = trace

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, weights = self.gate(flat)
        self._trace.append((chosen.detach(), weights.detach()))
        out = torch.zeros_like(flat, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]).float() * weights[rows, slot, None])
        out = out.to(x.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.query_key_value = nn.Linear(cfg["hidden_size"], (self.heads + 2 * self.kv_heads) * self.head_dim,
                                         bias=False)
        self.query_layernorm = RMSNorm(self.head_dim, eps)
        self.key_layernorm = RMSNorm(self.head_dim, eps)
        self.dense = nn.Linear(self.heads * self.head_dim, cfg["hidden_size"], bias=False)

    def forward(self, x, additive_mask, cos, sin):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q = self.query_layernorm(q).transpose(1, 2)  # [b, h, s, d]
        k = self.key_layernorm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + additive_mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        return self.dense(out)


class Layer(nn.Module):
    def __init__(self, cfg: dict, index: int, trace: list):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        dense = index < (cfg.get("first_k_dense_replace") or 0)
        self.mlp = MLP(cfg["hidden_size"], cfg["intermediate_size"]) if dense else MoE(cfg, trace)

    def forward(self, x, mask, cos, sin):
        x = x + self.attention(self.input_layernorm(x), mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: dict, trace: list):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"], cfg.get("pad_token_id"))
        self.layers = nn.ModuleList(Layer(cfg, i, trace) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))


class LLaDA2Reference(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        # per MoE layer of the last forward: (chosen experts [tokens, topk], their weights [tokens, topk])
        self.routing: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model = Backbone(cfg, self.routing)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rotary_dim = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
        theta = float(cfg.get("rope_theta", 600000))
        self.register_buffer("inv_freq", ops.rope_inverse_frequencies(rotary_dim, theta), persistent=False)

    def forward(self, input_ids, position_ids, attention_mask):
        """attention_mask: [b, 1, s, s], additive (0 / -inf-like) or boolean (True = may attend)."""
        if attention_mask.dtype == torch.bool:
            dtype = self.lm_head.weight.dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype).masked_fill(
                ~attention_mask, torch.finfo(dtype).min)
        self.routing.clear()
        x = self.model.word_embeddings(input_ids)
        cos, sin = ops.rope_tables(position_ids, self.inv_freq, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, rot]: every head alike
        for layer in self.model.layers:
            x = layer(x, attention_mask.to(x.dtype), cos, sin)
        logits = self.lm_head(self.model.norm(x)).float()
        return SimpleNamespace(logits=logits)


def reference_model(directory: str, dtype: torch.dtype = torch.float32) -> LLaDA2Reference:
    cfg, _ = read_hf_config(directory)
    with torch.device("meta"):
        model = LLaDA2Reference(cfg)
    reader = CheckpointReader(directory)
    state = {}
    for name in reader.names():
        tensor = reader.get(name)
        state[name] = tensor.float() if name.endswith("expert_bias") else tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rotary_dim = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
    theta = float(cfg.get("rope_theta", 600000))
    model.inv_freq = ops.rope_inverse_frequencies(rotary_dim, theta)  # built on meta above
    return model.eval()

