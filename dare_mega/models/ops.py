"""The arithmetic outside Megatron, stated once: RMSNorm, rotary embedding, SwiGLU, MoE routing.

The rollout engine's model (rollout/model.py), the plain-PyTorch LLaDA2 reference (models/llada2/reference.py)
and the RMSNorm of the Megatron layer spec (models/spec.py) all call these. tests/test_ops.py checks them
against slow, literal per-token transcriptions of the HF modeling code, which import nothing from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), the normalisation in float32 and cast back before the weight (HF Qwen3 / Bailing)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(torch.nn.Module):
    """`rms_norm` as a module with its `weight` (the plain-PyTorch references' norms, under HF names)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)


def rope_tables(positions: torch.Tensor, inverse_frequencies: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., rotary_dim] for integer positions [...] (the frequencies repeated, rotate-half layout)."""
    freqs = positions.float()[..., None] * inverse_frequencies
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x (partial rotary keeps the rest as they are)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def route(logits: torch.Tensor, topk: int, score_function: str = "softmax", norm_topk_prob: bool = True,
          expert_bias: torch.Tensor | None = None, num_groups: int | None = None, group_topk: int | None = None,
          scaling_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen experts [N, topk], their weights [N, topk]) from router logits [N, experts], as Megatron routes.

    softmax: with `norm_topk_prob`, top-k on the logits and a softmax over the k (= softmax, top-k, renormalise);
    without, the top-k of the softmax over all experts. sigmoid: the experts are chosen by score + expert_bias,
    restricted to the best `group_topk` of `num_groups` groups, a group scored by the sum of its top
    topk / group_topk selection scores; the weights are the unbiased scores of the chosen experts, normalised to
    sum 1. Then `scaling_factor`."""
    logits = logits.float()
    if score_function == "softmax":
        if norm_topk_prob:
            top, chosen = logits.topk(topk, dim=-1)
            weights = torch.softmax(top, dim=-1)
        else:
            weights, chosen = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        selection = scores + expert_bias if expert_bias is not None else scores
        if num_groups and num_groups > 1:
            per_group = logits.shape[-1] // num_groups
            group_scores = selection.view(-1, num_groups, per_group).topk(topk // group_topk, dim=-1)[0].sum(-1)
            keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(group_topk, dim=-1)[1], 1.0)
            selection = selection.masked_fill(~keep.repeat_interleave(per_group, dim=1).bool(), float("-inf"))
        chosen = selection.topk(topk, dim=-1)[1]
        weights = scores.gather(1, chosen)
        if topk > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"router score function {score_function!r}: expected 'softmax' or 'sigmoid'")
    if scaling_factor:
        weights = weights * scaling_factor
    return chosen, weights


def shift_logits(logits: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Dream's shifted prediction: the logits for the token at i are the output at i - 1 (logits [B, S, ...],
    positions [B, S]). A position whose position id is 0 starts a document (packed documents restart at 0)
    and keeps its own output, as Dream's generate keeps position 0's, so nothing crosses a document. The first
    token of a window that starts inside a document (a cached decoding forward) has no predecessor in it and keeps
    its own output too: the cached decoders feed one position early and never read it."""
    seq = torch.arange(logits.shape[1], device=logits.device)
    source = (seq[None, :] - (position_ids.to(logits.device) > 0).long()).clamp_min(0)
    index = source.reshape(source.shape + (1,) * (logits.dim() - 2)).expand_as(logits)
    return logits.gather(1, index)


# ---- grouped expert matrix products ---------------------------------------------------------------------
# Rows of `x` come grouped by expert (the router's permutation, done once); `counts` [G] says how many rows
# each expert has, on x's device. torch's grouped GEMM (torch.nn.functional.grouped_mm) runs every group in
# one kernel on GPUs that have it (bfloat16, compute capability >= 8.0); its CPU implementation is the same
# per-group products as a loop. Elsewhere (float32 on a GPU: parity runs) the loop below does the same
# arithmetic, reading the counts on the host.


def grouped_mm_available(x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands (x [M, K], weights [G, N, K])."""
    if x.device.type == "cpu":
        return hasattr(F, "grouped_mm") and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type != "cuda" or not hasattr(F, "grouped_mm"):
        return False
    aligned = x.shape[-1] % 8 == 0 and weights.shape[1] % 8 == 0  # 16-byte strides in bfloat16
    return (x.dtype == weights.dtype == torch.bfloat16 and aligned
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def grouped_offsets(counts: torch.Tensor) -> torch.Tensor:
    """The end row of each group (int32, on the counts' device): grouped_mm's `offs`."""
    return torch.cumsum(counts, 0).to(torch.int32)


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block g of x [M, K] times weights[g].T ([G, N, K]: each expert's Linear weight) -> [M, N]."""
    if grouped_mm_available(x, weights):
        return F.grouped_mm(x, weights.transpose(1, 2), offs=grouped_offsets(counts))
    pieces = torch.split(x, counts.tolist())
    return torch.cat([piece @ weights[g].T for g, piece in enumerate(pieces)])


def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """d(grouped_linear)/d(weights) for the output gradient grad [M, N] and input x [M, K] -> [G, N, K]."""
    if grouped_mm_available(x, grad.new_empty(1, grad.shape[1], 1)):
        return F.grouped_mm(grad.t(), x, offs=grouped_offsets(counts))
    pieces = zip(torch.split(grad, counts.tolist()), torch.split(x, counts.tolist()))
    return torch.stack([g.t() @ piece for g, piece in pieces])


def exact_float32_matmuls() -> list[str]:
    """Keep float32 products in float32: switch TensorFloat-32 off for matrix products (which an import or a
    training setup may have switched on: transformers' TrainingArguments(tf32=True), a user's
    `torch.backends.cuda.matmul.allow_tf32 = True`) and for cuDNN. Called by every float32 model (the Megatron
    model, the rollout engine), so a float32 parity run is never silently computed in TF32's 10-bit mantissa;
    bfloat16 runs are unaffected. Returns the matrix-product settings that were on (and are now off)."""
    import warnings

    changed = []
    if torch.get_float32_matmul_precision() != "highest":
        changed.append(f"torch.get_float32_matmul_precision() == {torch.get_float32_matmul_precision()!r}")
        torch.set_float32_matmul_precision("highest")
    if torch.backends.cuda.matmul.allow_tf32:
        changed.append("torch.backends.cuda.matmul.allow_tf32")
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if changed:
        warnings.warn("float32 model: TensorFloat-32 matrix products were on (" + ", ".join(changed) + "); "
                      "switched off so that float32 means float32 (train in bfloat16 for speed)", stacklevel=2)
    return changed
