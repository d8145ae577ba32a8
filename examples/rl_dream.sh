#!/usr/bin/env bash
# RL for a Dream masked diffusion model with torchrun, on one machine or many.
#
#   bash examples/rl_dream.sh
#       this machine, no arguments: SFT a tiny Dream on the synthetic task, then RL it; the last line is
#       accuracy_before_rl=<x> accuracy_after_rl=<y> heldout=<n>; metrics in RUN_DIR/rl/metrics.jsonl
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 NPROC_PER_NODE=8 MODEL=/ckpt/Dream-v0-Instruct-7B DATA=/data/math.parquet \
#     TP=2 PP=1 ALGO=d1 CONFIG=configs/recipes/algorithms/d1_dream.yaml bash examples/rl_dream.sh
#
# The same pipeline and variables as examples/rl_sdar_moe.sh (MODEL, ALGO, DATA, TASK, TP, PP, EP, SFT_STEPS,
# RL_STEPS, RUN_DIR, CONFIG, SFT_CONFIG; extra arguments are RL config overrides); only the defaults differ.
set -euo pipefail
export PRESET="${PRESET:-tiny-dream}"
export RUN_DIR="${RUN_DIR:-runs/rl_dream}"
export CONFIG="${CONFIG:-configs/recipes/rl_tiny_dream.yaml}"
export MASTER_PORT="${MASTER_PORT:-29514}"
exec bash "$(dirname "$0")/rl_sdar_moe.sh" "$@"
