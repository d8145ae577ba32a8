"""Megatron vs the families' references (transformers' Qwen3 / Qwen3-MoE / Qwen2 for Dream; the plain-PyTorch
LLaDA2, LLaDA and LLaDA-MoE), at every parallel layout (float32 on CPU).

Each case loads the same tiny HF checkpoint at a layout, runs the same seeded batch through Megatron's
pipeline schedule with micro-batches (each data-parallel rank its own rows), and compares logits, the loss
and every gradient shard with the reference: max |diff| <= 1e-5. All layouts are compared with the same
reference on the same batch, so loss and gradients are also equal across layouts.
"""

import pytest
from conftest import run_worker

TOL = 1e-5


def case(hf, mask="block", micro_batch_size=1, attention="auto", grads=True, experts="auto", **layout):
    return {"hf": hf, "layout": layout, "mask": mask, "micro_batch_size": micro_batch_size,
            "attention": attention, "grads": grads, "experts": experts}


def check(results):
    assert results, "no results"
    for r in results:
        name = f"{r['layout']} {r['mask']} ({r['hf'].rsplit('/', 1)[-1]}, attention {r['attention']})"
        assert r["max_abs_logit_diff"] <= TOL, f"{name}: logits differ by {r['max_abs_logit_diff']:.3e}"
        assert r["max_abs_logprob_diff"] <= TOL, f"{name}: log-probs differ by {r['max_abs_logprob_diff']:.3e}"
        if not r["grads"]:
            continue
        assert abs(r["loss_megatron"] - r["loss_reference"]) <= TOL, f"{name}: loss {r['loss_megatron']} vs {r['loss_reference']}"
        assert r["max_abs_grad_diff"] <= TOL, f"{name}: gradients differ by {r['max_abs_grad_diff']:.3e}"
        assert r["tensors_compared"] > 0, f"{name}: no gradient compared"
    for family in ("sdar-moe", "llada2-moe"):
        losses = [r["loss_megatron"] for r in results if r["grads"] and r["mask"] == "block" and family in r["hf"]]
        if len(losses) > 1:
            assert max(losses) - min(losses) <= TOL, f"{family}: losses differ across layouts: {losses}"


def llada_moe_variant(tmp_path) -> str:
    """The tiny LLaDA-MoE with what its published config leaves unused but its code supports: a dense first
    layer (moe_layer_freq 0), a shared expert, a rotary embedding on half of each head, no q/k norm."""
    from dare_mega.checkpoint.tiny import make_tiny_checkpoint
    from dare_mega.models.presets import load_preset

    cfg = {**load_preset("tiny-llada-moe"), "num_hidden_layers": 3, "moe_layer_freq": [0, 1, 1],
           "shared_expert_intermediate_size": 48, "partial_rotary_factor": 0.5, "qk_layernorm": False}
    return make_tiny_checkpoint(str(tmp_path / "tiny-llada-moe-variant"), preset=cfg, seed=1)


@pytest.mark.distributed
def test_parity_one_process(tiny_dir, tmp_path):
    dense, moe, llada2, llada = tiny_dir["sdar"], tiny_dir["sdar_moe"], tiny_dir["llada2_moe"], tiny_dir["llada"]
    check(run_worker(1, [
        case(dense), case(moe), case(moe, mask="block-causal"), case(dense, mask="causal"), case(llada2),
        case(moe, experts="sequential"),                     # Megatron's SequentialMLP (the default is grouped)
        case(llada, mask="full"),                            # masked diffusion: bidirectional per document
        case(tiny_dir["dream"], mask="full"),                # Dream: q/k/v biases, logits shifted per document
        case(tiny_dir["llada_moe"], mask="full"),            # LLaDA-MoE: qk-norm, top-k softmax weights as they are
        case(llada_moe_variant(tmp_path), mask="full"),      # its dense layer, shared expert, partial rotary
        # FlexAttention (the GPU kernel's arithmetic, eager here; it has no CPU backward): same logits
        case(dense, attention="flex", grads=False), case(moe, attention="flex", micro_batch_size=2, grads=False),
    ], tmp_path))


@pytest.mark.distributed
def test_parity_two_processes(tiny_dir, tmp_path):
    dense, moe, llada2, llada = tiny_dir["sdar"], tiny_dir["sdar_moe"], tiny_dir["llada2_moe"], tiny_dir["llada"]
    check(run_worker(2, [
        case(dense, tp=2),                                   # TP=2 with sequence parallelism
        case(moe, tp=2),                                     # MoE at TP=2 (experts at ETP=2)
        case(moe, ep=2, moe_dispatcher="alltoall"),
        case(moe, ep=2, moe_dispatcher="allgather"),
        case(dense, pp=2, micro_batch_size=1),               # 1F1B schedule, 4 micro-batches
        case(moe, pp=2, vpp=2, micro_batch_size=1),          # interleaved schedule
        case(llada2, pp=2),                                  # dense layer 0 and MoE layer 1 on stage 0
        case(llada, tp=2, mask="full"),                      # LLaDA at TP=2 with sequence parallelism
        case(llada, pp=2, vpp=2, mask="full"),               # and on the interleaved schedule
        case(tiny_dir["dream"], tp=2, mask="full"),          # Dream's biases sharded with their query groups
        case(tiny_dir["dream"], pp=2, vpp=2, mask="full"),   # the shift on the last stage only
        case(tiny_dir["llada_moe"], tp=2, mask="full"),      # LLaDA-MoE at TP=2 (experts at ETP=2) with SP
        case(tiny_dir["llada_moe"], pp=2, mask="full"),      # one MoE layer per stage
        case(tiny_dir["llada_moe"], ep=2, mask="full"),      # four experts per rank
    ], tmp_path))


@pytest.fixture(scope="module")
def four_processes(tiny_dir, tmp_path_factory) -> list[dict]:
    """The four-process layouts and the LLaDA2 router check, in one torchrun launch."""
    dense, moe, llada2 = tiny_dir["sdar"], tiny_dir["sdar_moe"], tiny_dir["llada2_moe"]
    return run_worker(4, [
        {"router": True, "hf": llada2, "layout": {"tp": 2, "ep": 2}},
        case(moe, ep=4, moe_dispatcher="alltoall"),
        case(moe, ep=4, moe_dispatcher="allgather"),
        case(moe, tp=2, ep=2),
        case(moe, tp=2, ep=2, moe_dispatcher="allgather", micro_batch_size=2),
        case(moe, tp=2, pp=2),
        case(moe, tp=2, ep=2, etp=2, mask="block-causal"),   # expert tensor parallel (gloo uneven gathers)
        case(dense, tp=2, pp=2, mask="causal"),
        case(llada2, tp=2, ep=2),                            # LLaDA2 with the block mask, SP, shared expert
        case(llada2, ep=4, moe_dispatcher="allgather", mask="block-causal"),
    ], tmp_path_factory.mktemp("four_processes"))


@pytest.mark.distributed
def test_parity_four_processes(four_processes):
    check([r for r in four_processes if "router" not in r])


@pytest.mark.distributed
def test_llada2_router_picks_the_same_experts(four_processes):
    """Group-limited selection on score + expert_bias, unbiased renormalised weights: token by token at TP2xEP2."""
    (report,) = [r["router"] for r in four_processes if "router" in r]
    assert report["bias_or_groups_change_choice"], "the test batch does not exercise biased / grouped selection"
    assert [layer["layer"] for layer in report["layers"]] == [2, 3, 4]  # layer 1 is dense
    for layer in report["layers"]:
        assert layer["same_experts"], f"layer {layer['layer']}: Megatron chose other experts"
        assert layer["max_abs_prob_diff"] <= 1e-6, f"layer {layer['layer']}: weights differ"
