#!/usr/bin/env bash
# RL for LLaDA2 (LLaDA2.0-mini / LLaDA2.1-mini: 16B-A1B MoE, block diffusion with 32-token blocks), with torchrun.
#
#   bash examples/rl_llada2_mini.sh
#       this machine, no arguments: SFT a tiny LLaDA2-MoE on the synthetic task, then RL it; the last line is
#       accuracy_before_rl=<x> accuracy_after_rl=<y> heldout=<n>; metrics in RUN_DIR/rl/metrics.jsonl
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 NPROC_PER_NODE=8 MODEL=/ckpt/LLaDA2.0-mini DATA=/data/math.jsonl \
#     TP=1 PP=2 EP=16 CONFIG=configs/recipes/rl_llada2_mini.yaml bash examples/rl_llada2_mini.sh
#
# The same pipeline and variables as examples/rl_sdar_moe.sh (MODEL, ALGO, DATA, TASK, TP, PP, EP, SFT_STEPS,
# RL_STEPS, RUN_DIR, CONFIG, SFT_CONFIG; extra arguments are RL config overrides); only the defaults differ.
set -euo pipefail
export PRESET="${PRESET:-tiny-llada2-moe}"
export RUN_DIR="${RUN_DIR:-runs/rl_llada2_mini}"
export CONFIG="${CONFIG:-configs/recipes/rl_tiny_llada2_moe.yaml}"
export MASTER_PORT="${MASTER_PORT:-29512}"
exec bash "$(dirname "$0")/rl_sdar_moe.sh" "$@"
