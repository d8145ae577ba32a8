"""A plain single-process PyTorch reference of the HF LLaDA-MoE model (LLaDAMoEModelLM), with the checkpoint's
own parameter names (model.embed_tokens, model.layers.{i}.self_attn.*, .mlp.*, lm_head).

transformers has no class for it (the published checkpoint ships its own modeling_lladamoe.py, OLMoE's code
made bidirectional), so this module re-states that code's semantics from the config, independently of the
Megatron code (the arithmetic of models/ops.py, which tests/test_ops.py checks against literal transcriptions
of the HF code). Per layer: x = x + o_proj(attention(input_layernorm(x))), then with h =
post_attention_layernorm(x), x = x + mlp(h) (+ shared_expert(h) on MoE layers when configured). Attention:
q / k / v projections without biases; with qk_layernorm an RMSNorm over each head's head_dim of q and of k;
rotate-half RoPE at rope_theta on the first head_dim * partial_rotary_factor dims; key / value heads repeated
for the query heads; softmax(q k^T / sqrt(head_dim) + mask) v in float32. A MoE block: router logits
gate(h), softmax over all experts in float32, the top num_experts_per_tok probabilities as the weights (never
renormalised: the published block hard-codes norm_topk_prob = False), each chosen SwiGLU expert's output times
its weight summed. Then the final RMSNorm `model.norm` and `lm_head` (the embedding with tie_word_embeddings).
The embedding keeps the published padding_idx (config's pad_token_id, configuration_lladamoe.py's default 1
without one), so that row gets no gradient, as in HF training.

The published model attends bidirectionally over positions 0..s-1 and ignores any attention mask; this
reference takes the positions and the mask as arguments (packed documents, each from position 0), which is
the published computation for one document with the full mask. `routing` records the experts each MoE layer
chose in the last forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from dare_mega.models import ops
from dare_mega.models.builder import read_hf_config
from dare_mega.models.llada2.reference import MLP  # the same gate_proj / up_proj / down_proj SwiGLU
from dare_mega.models.llada_moe.config import HF_DEFAULT_PAD_TOKEN_ID
from dare_mega.models.ops import RMSNorm
from dare_mega.storage.safetensors_io import CheckpointReader


def _head_dim(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _rotary_dim(cfg: dict) -> int:
    return int(_head_dim(cfg) * float(cfg.get("partial_rotary_factor", 1.0)))


class SparseMoE(nn.Module):
    def __init__(self, cfg: dict, trace: list):
        super().__init__()
        self.topk = cfg["num_experts_per_tok"]
        self.gate = nn.Linear(cfg["hidden_size"], cfg["num_experts"], bias=False)
        self.experts = nn.ModuleList(MLP(cfg["hidden_size"], cfg["expert_intermediate_size"])
                                     for _ in range(cfg["num_experts"]))
        self._trace = trace

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # softmax over every expert, then the top-k probabilities as they are (no renormalisation)
        chosen, weights = ops.route(self.gate(flat), self.topk, "softmax", norm_topk_prob=False)
        weights = weights.to(x.dtype)
        self._trace.append((chosen.detach(), weights.detach()))
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.view(shape)


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = _head_dim(cfg)
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        if cfg.get("qk_layernorm"):
            eps = float(cfg.get("rms_norm_eps", 1e-5))
            self.q_norm = RMSNorm(self.head_dim, eps)
            self.k_norm = RMSNorm(self.head_dim, eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, additive_mask, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # over each head's head_dim values
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, h, s, d]
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + additive_mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, index: int, trace: list):
        super().__init__()
        hidden, eps = cfg["hidden_size"], float(cfg.get("rms_norm_eps", 1e-5))
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        moe = bool(cfg["moe_layer_freq"][index])
        self.mlp = SparseMoE(cfg, trace) if moe else MLP(hidden, cfg["dense_intermediate_size"])
        shared = cfg.get("shared_expert_intermediate_size")
        self.shared_expert = MLP(hidden, shared) if moe and shared else None

    def forward(self, x, mask, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return x + out


class Backbone(nn.Module):
    def __init__(self, cfg: dict, trace: list):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"],
                                         cfg.get("pad_token_id", HF_DEFAULT_PAD_TOKEN_ID))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, trace) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], float(cfg.get("rms_norm_eps", 1e-5)))


class LLaDAMoEReference(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        # per MoE layer of the last forward: (chosen experts [tokens, topk], their weights [tokens, topk])
        self.routing: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model = Backbone(cfg, self.routing)
        if not cfg.get("tie_word_embeddings"):
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.register_buffer("inv_freq", ops.rope_inverse_frequencies(_rotary_dim(cfg), float(cfg["rope_theta"])),
                             persistent=False)

    def forward(self, input_ids, position_ids, attention_mask):
        """attention_mask: [b, 1, s, s], additive (0 / -inf-like) or boolean (True = may attend)."""
        embed = self.model.embed_tokens
        if attention_mask.dtype == torch.bool:
            dtype = embed.weight.dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype).masked_fill(
                ~attention_mask, torch.finfo(dtype).min)
        self.routing.clear()
        x = embed(input_ids)
        cos, sin = ops.rope_tables(position_ids, self.inv_freq, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, rotary_dim]: every head alike
        for layer in self.model.layers:
            x = layer(x, attention_mask.to(x.dtype), cos, sin)
        head = embed.weight if self.cfg.get("tie_word_embeddings") else self.lm_head.weight
        return SimpleNamespace(logits=F.linear(self.model.norm(x), head).float())


def named_tensors(model: LLaDAMoEReference, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or gradients) under the checkpoint's names (the module's own). An expert no token was routed
    to in the last backward has no gradient; it is a zero one, as the Megatron expert's accumulated gradient."""
    if not grads:
        return {name: param.detach() for name, param in model.named_parameters()}
    return {name: param.grad if param.grad is not None else torch.zeros_like(param)
            for name, param in model.named_parameters()}


def reference_model(directory: str, dtype: torch.dtype = torch.float32) -> LLaDAMoEReference:
    cfg, _ = read_hf_config(directory)
    with torch.device("meta"):
        model = LLaDAMoEReference(cfg)
    reader = CheckpointReader(directory)
    model.load_state_dict({name: reader.get(name).to(dtype) for name in reader.names()}, strict=True, assign=True)
    model.inv_freq = ops.rope_inverse_frequencies(_rotary_dim(cfg), float(cfg["rope_theta"]))  # built on meta
    return model.eval()
