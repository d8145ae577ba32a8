"""Grouped MoE experts (models/experts.py, models/ops.py) against Megatron's SequentialMLP and a per-expert loop.

The grouped module keeps SequentialMLP's parameters and replaces its forward with two grouped products; on CPU
torch's grouped GEMM computes each group's product as a loop would, so float32 logits, loss and every gradient
agree with SequentialMLP to 1e-5 (the GPU's bf16 figures are in docs/benchmarks.md). The rollout engine's MoE
(one permutation, grouped products, no host sync) is checked against the per-expert loop it replaced.
"""

import pytest
import torch

from dare_mega.models import ops

TOL = 1e-5


def per_expert_loop(x, weights, counts):
    rows, start = [], 0
    for g, count in enumerate(counts.tolist()):
        rows.append(x[start : start + count] @ weights[g].T)
        start += count
    return torch.cat(rows)


@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [0, 0, 12, 0], [1, 1, 1, 9]])
def test_grouped_products_and_their_gradients_equal_a_loop_over_experts(counts):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    weights = [torch.randn(8, 16, requires_grad=True) for _ in counts]
    from dare_mega.models.experts import grouped_expert_linear

    assert ops.grouped_mm_available(x, torch.stack(weights))  # float32 on CPU: torch's grouped GEMM itself
    out = grouped_expert_linear(x, counts, weights)
    expected = per_expert_loop(x, torch.stack(weights), counts)
    assert out.shape == expected.shape and (out - expected).abs().max() <= 1e-6
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *weights], grad)
    want = torch.autograd.grad(expected, [x, *weights], grad)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5
    # an expert with no tokens gets a zero gradient, not a missing one
    assert all(g.abs().sum() == 0 for g, c in zip(got[1:], counts.tolist()) if c == 0)
    # float64 takes the loop (no grouped GEMM for it): the backward against finite differences
    x64, w64 = x.detach().double().requires_grad_(), [w.detach().double().requires_grad_() for w in weights]
    assert not ops.grouped_mm_available(x64, torch.stack(w64))
    assert torch.autograd.gradcheck(lambda a, *w: grouped_expert_linear(a, counts, list(w)), (x64, *w64))


def _megatron_run(hf_dir, experts: str, dtype=torch.float32):
    from dare_mega.cli.parity import parity_batch
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.experts import GroupedExperts
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout

    chunks, args = build_from_hf(hf_dir, ParallelLayout(), RuntimeOptions(moe_experts=experts, params_dtype=dtype))
    kinds = {type(m).__name__ for m in chunks[0].modules() if "MLP" in type(m).__name__ or "Experts" in type(m).__name__}
    grouped = any(isinstance(m, GroupedExperts) for m in chunks[0].modules())
    chunks = wrap_for_training(chunks)
    runner = Runner(chunks, args)
    batch = parity_batch(args, "block", batch_size=2, seq_len=16, seed=3)
    logits = runner.logits(batch)
    loss = runner.loss_and_grads(batch)
    grads = {name: p.main_grad.detach().float().clone() for name, p in chunks[0].module.named_parameters()}
    return grouped, kinds, logits.float(), loss, grads


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_grouped_experts_equal_sequential_mlp(world1, tiny_dir, family):
    grouped, kinds, logits, loss, grads = _megatron_run(tiny_dir[family], "grouped")
    sequential, seq_kinds, seq_logits, seq_loss, seq_grads = _megatron_run(tiny_dir[family], "sequential")
    assert grouped and not sequential, (kinds, seq_kinds)
    assert "SequentialMLP" in seq_kinds
    assert (logits - seq_logits).abs().max() <= TOL
    assert abs(loss - seq_loss) <= TOL
    assert grads.keys() == seq_grads.keys()  # the same parameters under the same names
    experts = [n for n in grads if ".local_experts." in n]
    assert experts and all(grads[n].abs().sum() > 0 for n in experts[:2])
    worst = max((grads[n] - seq_grads[n]).abs().max().item() for n in grads)
    assert worst <= TOL, worst


# bfloat16 (a GPU's grouped kernel accumulates in another order than one product per expert): logits within
# BF16_TOL of each other, relative to their largest magnitude, and the loss to 1e-2 relative
BF16_TOL = 2e-2


def test_grouped_experts_equal_sequential_mlp_in_bfloat16(world1, tiny_dir):
    grouped, _, logits, loss, grads = _megatron_run(tiny_dir["sdar_moe"], "grouped", torch.bfloat16)
    sequential, _, seq_logits, seq_loss, seq_grads = _megatron_run(tiny_dir["sdar_moe"], "sequential", torch.bfloat16)
    assert grouped and not sequential
    scale = seq_logits.abs().max()
    assert (logits - seq_logits).abs().max() <= BF16_TOL * scale
    assert abs(loss - seq_loss) <= 1e-2 * abs(seq_loss)
    experts = [n for n in grads if ".local_experts." in n]
    for name in experts:
        assert (grads[name] - seq_grads[name]).abs().max() <= BF16_TOL * seq_grads[name].abs().max().clamp(min=1e-6)


def test_unknown_expert_choice_is_refused(world1, tiny_dir):
    from dare_mega.errors import ConfigError
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout

    with pytest.raises(ConfigError, match="model.experts='batched'"):
        build_from_hf(tiny_dir["sdar_moe"], ParallelLayout(), RuntimeOptions(moe_experts="batched"))


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe", "llada_moe"])
def test_engine_moe_is_the_per_expert_computation(tiny_dir, family):
    """The rollout engine's grouped MoE layer against the loop over experts it replaced (float32)."""
    from dare_mega.rollout.engine import NativeEngine

    engine = NativeEngine.from_pretrained(tiny_dir[family], tokenizer=False)
    model = engine.model
    layer = next(i for i in range(model.args.num_layers) if model.args.layer_is_moe(i))
    torch.manual_seed(1)
    x = torch.randn(3, 8, model.args.hidden_size)
    got = model._moe(layer, x)

    flat = x.reshape(-1, x.shape[-1])
    chosen, weights = model._route(layer, flat)
    L = f"decoder.layers.{layer}.mlp"
    fc1, fc2 = model.w(f"{L}.experts.linear_fc1.weight"), model.w(f"{L}.experts.linear_fc2.weight")
    want = torch.zeros_like(flat)
    for n in range(flat.shape[0]):  # token by token, expert by expert
        for e, w in zip(chosen[n].tolist(), weights[n].tolist()):
            gate, up = (flat[n] @ fc1[e].T).chunk(2)
            want[n] += w * (ops.swiglu(gate, up) @ fc2[e].T)
    if model.args.moe.shared_expert_ffn_hidden_size:
        want = want + model._swiglu(flat, model.w(f"{L}.shared_experts.linear_fc1.weight"),
                                    model.w(f"{L}.shared_experts.linear_fc2.weight"))
    assert (got.reshape(-1, x.shape[-1]) - want).abs().max() <= TOL


def test_float32_models_switch_tensor_float_32_off(tiny_dir):
    """TF32 switched on by someone else does not silently turn a float32 run into a 10-bit-mantissa one."""
    from dare_mega.rollout.engine import NativeEngine

    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.warns(UserWarning, match="TensorFloat-32"):
            NativeEngine.from_pretrained(tiny_dir["sdar_moe"], tokenizer=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.allow_tf32
        assert ops.exact_float32_matmuls() == []  # nothing left to switch off: no warning
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
