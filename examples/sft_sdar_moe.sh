#!/usr/bin/env bash
# SFT of an SDAR-MoE model with torchrun, on one machine or many.
#
#   bash examples/sft_sdar_moe.sh                              # this machine, the tiny preset, built-in data
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 NPROC_PER_NODE=8 \
#     CONFIG=configs/recipes/sft_sdar_30b_a3b.yaml bash examples/sft_sdar_moe.sh model.hf=/ckpt/SDAR-30B-A3B-Chat
#
# Run the same command on every node with its NODE_RANK. Extra arguments are config overrides
# (section.key=value). Without GPUs the processes run on the CPU with gloo (2 per node by default).
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-configs/recipes/sft_tiny_sdar_moe.yaml}"

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
else
  NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

echo "sft_sdar_moe: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} processes per node, master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}"
exec python -m torch.distributed.run \
  --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC_PER_NODE}" \
  --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
  -m dare_mega.trainer.sft --config "${CONFIG}" "$@"
