#!/usr/bin/env bash
# RL for a LLaDA masked diffusion model with torchrun, on one machine or many.
#
#   bash examples/rl_llada.sh
#       this machine, no arguments: SFT a tiny LLaDA on the synthetic task, then RL it; the last line is
#       accuracy_before_rl=<x> accuracy_after_rl=<y> heldout=<n>; metrics in RUN_DIR/rl/metrics.jsonl
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 NPROC_PER_NODE=8 MODEL=/ckpt/LLaDA-8B-Instruct DATA=/data/math.parquet \
#     TP=2 PP=1 ALGO=d1 CONFIG=configs/recipes/algorithms/d1_llada.yaml bash examples/rl_llada.sh
#
# The same pipeline and variables as examples/rl_sdar_moe.sh (MODEL, ALGO, DATA, TASK, TP, PP, EP, SFT_STEPS,
# RL_STEPS, RUN_DIR, CONFIG, SFT_CONFIG; extra arguments are RL config overrides); only the defaults differ.
# LLaDA-8B-Base / -Instruct and LLaDA-1.5 share the architecture (LLaDAModelLM).
set -euo pipefail
export PRESET="${PRESET:-tiny-llada}"
export RUN_DIR="${RUN_DIR:-runs/rl_llada}"
export CONFIG="${CONFIG:-configs/recipes/rl_tiny_llada.yaml}"
export MASTER_PORT="${MASTER_PORT:-29513}"
exec bash "$(dirname "$0")/rl_sdar_moe.sh" "$@"
