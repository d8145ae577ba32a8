"""The rollout engine's model: one plain-PyTorch forward for every family, with a block KV cache.

Why not the Megatron model at TP=1: the engine must load weights by HF name (what the trainer's weight sync
and SGLang speak), run without process groups in any process, and keep a per-request KV cache; Megatron's
inference context is built for autoregressive decoding. Why not each family's HF code: SDAR and LLaDA2
differ only in a few switches (ModelArgs), and one forward keeps the cached and uncached paths identical.

The weights are held in Megatron's layout, the *full* tensors of the family's mapping table (linear_qkv
grouped per query group, fc1 as [gate ; up], experts stacked [E, ...]), so loading uses the same table as
the trainer (`row.to_megatron`), and the arithmetic is the Megatron model's: the same numbers in float32.

A forward takes tokens [B, T] at explicit positions, attends to the cached keys of each row (positions
below that row's cache length) plus, among the new tokens, what `new_mask` [B, T, T] allows, and can write
the new keys and values into the cache at their positions (prefill and the commit pass of a finished block):
diffusion/kv_cache.py, the same rule as the Megatron model's cached attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dare_mega.diffusion.kv_cache import CachedBlocks
from dare_mega.models import names, ops
from dare_mega.models.args import ModelArgs
from dare_mega.models.family import require_features
from dare_mega.models.weight_mapping import LayoutContext, MappingTable


class InferenceModel(torch.nn.Module):
    # what this forward implements (models/family.py: FEATURES); decoding is block by block
    FEATURES = frozenset({"qk_norm", "qkv_bias", "shifted_logits", "partial_rope", "router_softmax",
                          "router_sigmoid", "router_sigmoid_grouped", "expert_bias", "shared_expert",
                          "full_attention"})

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, device="cpu"):
        require_features(args, self.FEATURES, "the native rollout engine (rollout/model.py)")
        super().__init__()
        if dtype == torch.float32:
            ops.exact_float32_matmuls()
        self.args = args
        self.dtype = dtype
        self.device = torch.device(device)
        self.weights: dict[str, torch.Tensor] = {}
        self.routing_record: dict[int, torch.Tensor] | None = None  # set to a dict to record chosen experts
        rot = int(args.head_dim * args.rotary_percent)
        self.rotary_dim = rot
        self.inv_freq = ops.rope_inverse_frequencies(rot, args.rope_theta, self.device)

    # ---- weights ---------------------------------------------------------------------------------------
    def set_full(self, name: str, full: torch.Tensor) -> None:
        """Store a full Megatron tensor under its canonical name; experts go into their layer's stack."""
        full = full.to(self.device, torch.float32 if name.endswith("expert_bias") else self.dtype)
        key, expert = names.split_expert(name)
        if expert is not None:
            stack = self.weights.get(key)
            if stack is None or stack.shape[1:] != full.shape:
                stack = torch.zeros((self.args.moe.num_experts,) + tuple(full.shape), dtype=full.dtype,
                                    device=self.device)
                self.weights[key] = stack
            stack[expert] = full
        else:
            self.weights[name] = full

    def load_from_reader(self, table: MappingTable, reader) -> int:
        """All tensors from an HF CheckpointReader, through the mapping table."""
        ctx = LayoutContext.of(self.args)
        count = 0
        for binding in table.bindings():
            self.set_full(binding.megatron_name, binding.row.to_megatron([reader.get(n) for n in binding.hf_names], ctx))
            count += 1
        return count

    def missing(self, table: MappingTable) -> list[str]:
        wanted = {names.split_expert(binding.megatron_name)[0] for binding in table.bindings()}
        return sorted(wanted - set(self.weights))

    def w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    # ---- arithmetic ------------------------------------------------------------------------------------
    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return ops.rms_norm(x, weight, eps)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads, d]; rotate-half on the first rotary_dim dims."""
        cos, sin = ops.rope_tables(positions, self.inv_freq, x.dtype)
        return ops.apply_rope(x, cos[:, :, None], sin[:, :, None])

    def _attention(self, layer: int, x, positions, cached: CachedBlocks | None, new_mask):
        a = self.args
        L = f"decoder.layers.{layer}"
        b, t, _ = x.shape
        groups, per_group, d = a.num_kv_heads, a.num_attention_heads // a.num_kv_heads, a.head_dim
        qkv = x @ self.w(f"{L}.self_attention.linear_qkv.weight").T
        if a.qkv_bias:
            qkv = qkv + self.w(f"{L}.self_attention.linear_qkv.bias")
        qkv = qkv.view(b, t, groups, (per_group + 2) * d)
        q, k, v = torch.split(qkv, [per_group * d, d, d], dim=-1)
        q = q.reshape(b, t, groups * per_group, d)
        if a.qk_norm:
            q = self._rms(q, self.w(f"{L}.self_attention.q_layernorm.weight"), a.norm_eps)
            k = self._rms(k, self.w(f"{L}.self_attention.k_layernorm.weight"), a.norm_eps)
        q, k = self._rope(q, positions), self._rope(k, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        if cached is not None:
            out = cached.attend(layer, q, k, v, d**-0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=new_mask[:, None], enable_gqa=per_group > 1,
                                                 scale=d**-0.5)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return out @ self.w(f"{L}.self_attention.linear_proj.weight").T

    @staticmethod
    def _swiglu(x, fc1, fc2):
        return ops.swiglu(*(x @ fc1.T).chunk(2, dim=-1)) @ fc2.T

    def _route(self, layer: int, x: torch.Tensor):
        """(chosen experts [N, k], their weights [N, k]) as Megatron's router computes them."""
        moe = self.args.moe
        L = f"decoder.layers.{layer}.mlp.router"
        logits = x.float() @ self.w(f"{L}.weight").float().T
        return ops.route(logits, moe.topk, moe.score_function, moe.norm_topk_prob,
                         self.w(f"{L}.expert_bias") if moe.expert_bias else None, moe.num_groups, moe.group_topk,
                         moe.scaling_factor)

    def _moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        L = f"decoder.layers.{layer}.mlp"
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, weights = self._route(layer, flat)
        if self.routing_record is not None:  # models/routing.py compares it with the trainer's routing
            self.routing_record[layer] = chosen.view(*shape[:-1], -1).cpu()
        fc1, fc2 = self.w(f"{L}.experts.linear_fc1.weight"), self.w(f"{L}.experts.linear_fc2.weight")
        # the router's permutation, once: rows grouped by expert, then every expert in one grouped product
        order = chosen.reshape(-1).argsort(stable=True)
        token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(chosen.shape[1])[order]
        # counted on the device (bincount would read the largest id on the host first)
        counts = torch.zeros(fc1.shape[0], dtype=torch.long, device=x.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones_like(chosen.reshape(-1)))
        gate, up = ops.grouped_linear(flat[token], fc1, counts).chunk(2, dim=-1)
        y = ops.grouped_linear(ops.swiglu(gate, up), fc2, counts)
        out = torch.zeros_like(flat, dtype=torch.float32)
        out.index_add_(0, token, y.float() * weights.reshape(-1)[order, None])
        out = out.to(x.dtype)
        if self.args.moe.shared_expert_ffn_hidden_size:
            out = out + self._swiglu(flat, self.w(f"{L}.shared_experts.linear_fc1.weight"),
                                     self.w(f"{L}.shared_experts.linear_fc2.weight"))
        return out.view(shape)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, new_mask: torch.Tensor,
                cached: CachedBlocks | None = None, logits: bool = True, window: tuple | None = None):
        """tokens, positions [B, T]; new_mask [B, T, T] (True = may attend) among the new tokens.

        With `cached` (diffusion/kv_cache.py), every new token also sees its row's cached positions, and the
        tokens it marks write their keys and values. Returns float32 logits [B, T, vocab], or None when
        `logits` is False; for a shifted-prediction model (Dream) the logits of token i at position i, where the
        first new token's (its predecessor may be cached) are its own output: a caller that needs them feeds one
        position earlier (rollout/masked_cache.py). `window` = (starts [B], width): only the logits of tokens
        starts[b] .. starts[b] + width - 1 of each row, [B, width, vocab] (the output layer runs on those alone:
        a masked diffusion forward over the whole canvas needs one block's)."""
        a = self.args
        shifted = a.diffusion is not None and a.diffusion.shifted_logits
        x = self.w("embedding.word_embeddings.weight")[tokens]
        for layer in range(a.num_layers):
            L = f"decoder.layers.{layer}"
            h = self._rms(x, self.w(f"{L}.input_layernorm.weight"), a.norm_eps)
            x = x + self._attention(layer, h, positions, cached, new_mask)
            h = self._rms(x, self.w(f"{L}.pre_mlp_layernorm.weight"), a.norm_eps)
            if a.layer_is_moe(layer):
                x = x + self._moe(layer, h)
            else:
                x = x + self._swiglu(h, self.w(f"{L}.mlp.linear_fc1.weight"), self.w(f"{L}.mlp.linear_fc2.weight"))
        if not logits:
            return None
        if window is not None:
            starts, width = window
            index = starts.to(x.device)[:, None] + torch.arange(width, device=x.device)  # [B, width]
            if shifted:  # the output one position earlier, except where a document starts (ops.shift_logits)
                index = (index - (positions.gather(1, index) > 0).long()).clamp_min(0)
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        x = self._rms(x, self.w("decoder.final_layernorm.weight"), a.norm_eps)
        out = (x @ self.w("output_layer.weight").T).float()
        return ops.shift_logits(out, positions) if shifted and window is None else out
