"""MoE experts as grouped matrix products, without Transformer Engine.

Megatron-Core's expert modules without Transformer Engine are SequentialMLP (one expert at a time, with a
host sync on the token counts) and the legacy GroupedMLP (needs the `grouped_gemm` package and has its own
parameter layout). `GroupedExperts` keeps SequentialMLP's parameters exactly (`local_experts.<k>.linear_fc1.
weight`, the same initialisation, tensor-parallel attributes and checkpoint keys, so the mapping tables,
weight sync and torch_dist checkpoints do not change) and replaces its forward: the dispatcher's tokens
arrive grouped by local expert (the router's permutation, done once), fc1 of every local expert is one
grouped product, then SwiGLU times the routing probabilities, then fc2 as one grouped product
(models/ops.py: grouped_linear, torch's grouped GEMM where the GPU has it).

The expert weights are separate parameters, so the grouped product stacks them for the kernel; the autograd
function below keeps only references to the parameters for the backward (not the stacked copy) and hands each
expert its slice of the grouped weight gradient. Like SequentialMLP it does no communication: under expert
tensor parallelism the token dispatcher gathers and reduces around it.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from dare_mega.errors import ConfigError
from dare_mega.models import ops


class _GroupedLinear(torch.autograd.Function):
    """x [M, K] grouped by `counts` [G] times each group's weight [N, K].T; the weights come as G tensors."""

    @staticmethod
    def forward(ctx, x, counts, *weights):
        ctx.save_for_backward(x, counts, *weights)
        return ops.grouped_linear(x, torch.stack(weights), counts)

    @staticmethod
    def backward(ctx, grad):
        x, counts, *weights = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad [M, N] times each group's weight [N, K]: the same grouped product with the weights transposed
            grad_x = ops.grouped_linear(grad, torch.stack(weights).transpose(1, 2), counts)
        grad_w = ops.grouped_weight_grad(grad, x, counts)
        return (grad_x, None, *grad_w.to(weights[0].dtype).unbind(0))


def grouped_expert_linear(x: torch.Tensor, counts: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return _GroupedLinear.apply(x, counts, *weights)


class GroupedExperts(SequentialMLP):
    """SequentialMLP's parameters, every local expert in one grouped product per linear layer."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        unsupported = [name for name, on in (("fp8", config.fp8), ("fp4", getattr(config, "fp4", None)),
                                             ("moe_apply_probs_on_input", config.moe_apply_probs_on_input),
                                             ("add_bias_linear", config.add_bias_linear),
                                             ("activation_func_clamp_value", config.activation_func_clamp_value),
                                             ("glu_linear_offset", config.glu_linear_offset)) if on]
        if unsupported or not config.gated_linear_unit:
            raise ConfigError("grouped experts without Transformer Engine (models/experts.py) implement gated "
                              "(SwiGLU) experts without biases in bf16/fp32; this model sets "
                              + ", ".join(unsupported or ["gated_linear_unit=False"])
                              + ": use the sequential experts (model.experts=sequential)")
        super().__init__(num_local_experts, config, submodules, pg_collection)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        counts = tokens_per_expert.to(device=x.device, dtype=torch.long)
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        hidden = grouped_expert_linear(x, counts, fc1)
        gate, up = torch.chunk(hidden, 2, dim=-1)
        activated = self.config.activation_func(gate) * up
        # as Megatron's MLP: the routing probability scales the activation, then back to the compute dtype
        activated = (activated * permuted_probs.unsqueeze(-1)).to(hidden.dtype)
        return grouped_expert_linear(activated, counts, fc2), None
