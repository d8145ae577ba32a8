"""models/ops.py against slow, literal per-token transcriptions of the HF modeling code (nothing imported from
dare_mega for the expected values): RMSNorm, rotate-half partial RoPE, SwiGLU, Qwen3-MoE's softmax router and
BailingMoeV2's (LLaDA2) grouped sigmoid router with expert bias and scaling."""

from __future__ import annotations

import math

import pytest
import torch

from dare_mega.models import ops


def test_rms_norm():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g)
    expected = torch.empty_like(x)
    for i in range(3):
        for j in range(5):
            row = x[i, j].tolist()
            rms = math.sqrt(sum(v * v for v in row) / len(row) + 1e-6)
            expected[i, j] = torch.tensor([w[k].item() * row[k] / rms for k in range(16)])
    assert torch.allclose(ops.rms_norm(x, w, 1e-6), expected, atol=1e-5)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rope_rotates_pairs_half_apart(partial):
    """Dimension i < rot/2 pairs with i + rot/2 and turns by position * theta^(-2i / rot); the rest stay."""
    g = torch.Generator().manual_seed(1)
    d, theta = 8, 10000.0
    rot = int(d * partial)
    x, positions = torch.randn(2, 4, 3, d, generator=g), torch.tensor([[0, 3, 7, 2], [5, 1, 0, 9]])
    cos, sin = ops.rope_tables(positions, ops.rope_inverse_frequencies(rot, theta), x.dtype)
    got = ops.apply_rope(x, cos[:, :, None], sin[:, :, None])
    expected = x.clone()
    for b in range(2):
        for t in range(4):
            for h in range(3):
                for i in range(rot // 2):
                    angle = positions[b, t].item() * theta ** (-2 * i / rot)
                    a, c = x[b, t, h, i].item(), x[b, t, h, i + rot // 2].item()
                    expected[b, t, h, i] = a * math.cos(angle) - c * math.sin(angle)
                    expected[b, t, h, i + rot // 2] = c * math.cos(angle) + a * math.sin(angle)
    assert torch.allclose(got, expected, atol=1e-5)


def test_swiglu():
    gate, up = torch.tensor([-2.0, 0.0, 1.5]), torch.tensor([3.0, 4.0, -1.0])
    expected = torch.tensor([g / (1 + math.exp(-g)) * u for g, u in zip(gate.tolist(), up.tolist())])
    assert torch.allclose(ops.swiglu(gate, up), expected, atol=1e-6)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_softmax_router_is_qwen3_moe(norm_topk_prob):
    """Qwen3-MoE: softmax over all experts in fp32, top-k, renormalised when norm_topk_prob."""
    g = torch.Generator().manual_seed(2)
    logits, k = torch.randn(6, 8, generator=g), 3
    chosen, weights = ops.route(logits, k, "softmax", norm_topk_prob)
    for n in range(6):
        row = logits[n].tolist()
        z = sum(math.exp(v) for v in row)
        probs = [math.exp(v) / z for v in row]
        top = sorted(range(8), key=lambda e: -probs[e])[:k]
        total = sum(probs[e] for e in top) if norm_topk_prob else 1.0
        assert chosen[n].tolist() == top
        assert torch.allclose(weights[n], torch.tensor([probs[e] / total for e in top]), atol=1e-6)


def hf_bailing_gate(logits, bias, topk, n_group, topk_group, scaling):
    """BailingMoeV2's gate for one token, literally: groups scored by their top-2 biased scores."""
    scores = [1 / (1 + math.exp(-v)) for v in logits]
    biased = [s + b for s, b in zip(scores, bias)]
    size = len(scores) // n_group
    group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    allowed = [e for e in range(len(scores)) if e // size in groups]
    chosen = sorted(allowed, key=lambda e: -biased[e])[:topk]
    total = sum(scores[e] for e in chosen) + 1e-20
    return chosen, [scores[e] / total * scaling for e in chosen]


@pytest.mark.parametrize("experts,topk,n_group,topk_group", [(32, 8, 8, 4), (16, 4, 4, 2), (64, 8, 8, 4)])
def test_sigmoid_group_router_is_bailing(experts, topk, n_group, topk_group):
    g = torch.Generator().manual_seed(experts)
    logits, bias = torch.randn(12, experts, generator=g), 0.3 * torch.randn(experts, generator=g)
    chosen, weights = ops.route(logits, topk, "sigmoid", expert_bias=bias, num_groups=n_group,
                                group_topk=topk_group, scaling_factor=2.5)
    for n in range(12):
        want, want_w = hf_bailing_gate(logits[n].tolist(), bias.tolist(), topk, n_group, topk_group, 2.5)
        assert chosen[n].tolist() == want
        assert torch.allclose(weights[n], torch.tensor(want_w), atol=1e-6)


def test_the_oracle_would_see_a_different_group_rule():
    """Scoring groups by their top-1 (not top-2) picks other experts on some tokens: the comparison can fail."""
    g = torch.Generator().manual_seed(5)
    logits, bias = torch.randn(64, 32, generator=g), torch.zeros(32)
    chosen, _ = ops.route(logits, 4, "sigmoid", expert_bias=bias, num_groups=8, group_topk=4)  # top-1 per group
    differ = sum(chosen[n].tolist() != hf_bailing_gate(logits[n].tolist(), [0.0] * 32, 4, 8, 4, 1.0)[0]
                 for n in range(64))
    assert differ > 0
