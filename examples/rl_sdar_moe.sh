#!/usr/bin/env bash
# RL for an SDAR-MoE model with torchrun, on one machine or many.
#
#   bash examples/rl_sdar_moe.sh
#       this machine, no arguments: SFT a tiny SDAR-MoE on a synthetic verifiable task ("max 3 6 2 5" -> "6"),
#       then RL it; prints held-out accuracy before and after RL (last line), metrics in RUN_DIR/rl/metrics.jsonl
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 NPROC_PER_NODE=8 MODEL=/ckpt/SDAR-30B-A3B-Chat DATA=/data/math.jsonl \
#     TP=2 PP=4 EP=8 CONFIG=configs/recipes/rl_sdar_30b_a3b.yaml bash examples/rl_sdar_moe.sh
#
# Variables: MODEL (an HF checkpoint; default: the tiny preset), ALGO (estimator: trajectory, d1, coupled, bgpo,
# ebpo, espo, spg), DATA (JSONL / Parquet prompts with the reward's fields; default: the synthetic task), TASK,
# TP, PP, EP, SFT_STEPS (warm-up SFT before RL; default 30 for the tiny default, 0 with MODEL), RL_STEPS,
# RUN_DIR, CONFIG, SFT_CONFIG. Extra arguments are RL config overrides (section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29511}"
RUN_DIR="${RUN_DIR:-runs/rl_sdar_moe}"
CONFIG="${CONFIG:-configs/recipes/rl_tiny_sdar_moe.yaml}"
SFT_CONFIG="${SFT_CONFIG:-configs/recipes/sft_tiny_sdar_moe.yaml}"
PRESET="${PRESET:-tiny-sdar-moe}"
TASK="${TASK:-max}"
ALGO="${ALGO:-trajectory}"
TP="${TP:-1}"; PP="${PP:-1}"; EP="${EP:-1}"
if [[ -n "${MODEL:-}" ]]; then SFT_STEPS="${SFT_STEPS:-0}"; else SFT_STEPS="${SFT_STEPS:-30}"; fi

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
else
  NPROC_PER_NODE="${NPROC_PER_NODE:-1}"  # tiny models on a CPU: one process is the fastest
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
fi

launch() {
  python -m torch.distributed.run --nnodes "${NNODES}" --node-rank "${NODE_RANK}" \
    --nproc-per-node "${NPROC_PER_NODE}" --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" "$@"
}

model_args=("model.preset=${PRESET}")
[[ -n "${MODEL:-}" ]] && model_args=("model.hf=${MODEL}")
layout=("parallel.tp=${TP}" "parallel.pp=${PP}" "parallel.ep=${EP}")
task_args=("task.name=${TASK}")
[[ -n "${DATA:-}" ]] && task_args=("task.name=file" "task.train=${DATA}")

init=()
if (( SFT_STEPS > 0 )); then
  echo "rl_sdar_moe: SFT warm-up, ${SFT_STEPS} steps, task ${TASK}"
  launch -m dare_mega.trainer.sft --config "${SFT_CONFIG}" "run_dir=${RUN_DIR}/sft" "${model_args[@]}" "${layout[@]}" \
    "data.task=${TASK}" "data.synthetic_samples=512" "train.steps=${SFT_STEPS}" "checkpoint.every=${SFT_STEPS}" \
    "optim.warmup_steps=5" "logging.progress=false"
  init=("model.init=$(ls -d "${RUN_DIR}"/sft/checkpoints/step_* | sort | tail -1)")
fi

echo "rl_sdar_moe: RL with ${ALGO} on ${NNODES} node(s) x ${NPROC_PER_NODE} process(es)"
launch -m dare_mega.trainer.rl --config "${CONFIG}" "run_dir=${RUN_DIR}/rl" "${model_args[@]}" "${layout[@]}" \
  "${task_args[@]}" "${init[@]}" "algorithm.estimator=${ALGO}" ${RL_STEPS:+"train.steps=${RL_STEPS}"} "$@"
