"""Routing of the Megatron LLaDA2 model vs the reference at one layout (run by parity_worker.py under torchrun).

Every MoE layer's router is hooked; its routing map and probabilities (sequence-parallel pieces gathered over
TP) are compared token by token with the experts and weights the reference chose.
"""


import torch
import torch.distributed as dist


def router_report(hf_dir: str, layout_spec: dict) -> dict:
    """The comparison at one layout (torch.distributed already initialised by parity_worker)."""
    from megatron.core import parallel_state as ps

    from dare_mega.cli.parity import dense_mask, parity_batch
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.reference import reference_logits, reference_model
    from dare_mega.models.runner import Runner
    from dare_mega.parallel import ParallelLayout, init_model_parallel

    layout = ParallelLayout(**layout_spec)
    init_model_parallel(layout)
    chunks, args = build_from_hf(hf_dir, layout)
    captured = []
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            if hasattr(layer.mlp, "router"):
                number = layer.layer_number
                layer.mlp.router.register_forward_hook(
                    lambda module, inputs, output, number=number: captured.append((number, output[0], output[1])))
    batch = parity_batch(args, "block", batch_size=2, seq_len=16, seed=3)
    Runner(chunks, args).logits(batch, micro_batch_size=batch.size)

    reference = reference_model(hf_dir)
    reference_logits(reference, batch.input_ids, batch.position_ids, dense_mask(batch))
    moe_layers = [i + 1 for i in range(args.num_layers) if args.layer_is_moe(i)]
    ref_by_layer = dict(zip(moe_layers, reference.routing))
    b, s = batch.input_ids.shape
    report = {"layers": [], "tokens": b * s}
    tp_group = ps.get_tensor_model_parallel_group()
    for number, probs, routing_map in captured:
        if layout.sp and ps.get_tensor_model_parallel_world_size() > 1:  # each TP rank routed its slice of s
            pieces = [torch.empty_like(probs) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(pieces, probs.contiguous(), group=tp_group)
            probs = torch.cat(pieces)
        chosen, weights = ref_by_layer[number]
        experts = chosen.shape[1]
        # the reference flattens [b, s] tokens, Megatron [s, b]
        chosen = chosen.view(b, s, experts).transpose(0, 1).reshape(-1, experts)
        weights = weights.view(b, s, experts).transpose(0, 1).reshape(-1, experts)
        ref_map = torch.zeros(probs.shape, dtype=torch.bool).scatter(1, chosen, True)
        ref_probs = torch.zeros(probs.shape).scatter(1, chosen, weights)
        report["layers"].append({
            "layer": number,
            "same_experts": bool(torch.equal(probs.cpu() != 0, ref_map)),
            "max_abs_prob_diff": (probs.cpu().float() - ref_probs).abs().max().item(),
        })
    # sensitivity: the expert bias and the group limit change the choice for some tokens
    gate = reference.model.layers[moe_layers[0] - 1].mlp.gate
    x = torch.randn(64, args.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = torch.sigmoid(torch.nn.functional.linear(x, gate.weight)).topk(gate.topk, dim=-1).indices
        chosen, _ = gate(x)
    report["bias_or_groups_change_choice"] = not torch.equal(plain.sort(-1).values, chosen.sort(-1).values)
    return report

