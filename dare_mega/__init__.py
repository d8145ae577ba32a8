"""dare_mega: Megatron-Core post-training (SFT, RL, preference optimization) for diffusion LLMs."""

import warnings

__version__ = "0.1.0"

# Megatron-Core announces each missing optional kernel package at import; dare_mega picks the pure-torch
# path itself (docs/dependencies.md), so these say nothing new.
for _message in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",  # Megatron's own default for cuda_graph_scope
    r".*Disabling sequence parallel.*",  # expert layers at ETP=1 under SP: expected
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    # Megatron's torch_dist format is built on DCP's ShardedTensor and load_state_dict
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
    r".*`load_state_dict` is deprecated and will be removed.*",
):
    warnings.filterwarnings("ignore", message=_message)
