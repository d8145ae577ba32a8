#!/usr/bin/env bash
# The project's GPU paths and benchmarks in one run on one CUDA GPU (about 9 minutes on an H100):
#
#   bash benchmarks/gpu_checks.sh                       # on the GPU machine, with $OUT set
#   GPU_CHECKS_SMOKE=1 bash benchmarks/gpu_checks.sh    # the same steps at toy sizes (a CPU: checks the plumbing)
#
# Steps, in priority order (each time-limited; a step is skipped once the budget is spent):
#   env          nvidia-smi, python / torch / transformers / megatron versions, `import dare_mega, megatron.core`
#   cuda_replay  the two tests the last GPU run failed (replaying a trajectory gives the rollout's log-probs,
#                MoE families), alone, verbose, with torch.compile's recompilations logged
#   parity       Megatron (CUDA, NCCL, one process under torchrun) vs the HF reference: logits, loss, gradients
#                (benchmarks/cuda_parity.py)                                      } these two run side by side
#   pytest       in-process tests that run on CUDA when present: rollout engine,  }
#                RL estimators and exact gradients, masks through the model, SFT packing, grouped experts vs
#                SequentialMLP, the device decoding loop vs the host loop
#   cuda_ipc     colocated SGLang weight sync through CUDA-IPC handles (GPU UUIDs) to another process that
#                decodes with SGLang's own code (needs sglang importable), bit-exact
#                (benchmarks/cuda_ipc_check.py)
#   fb_*         benchmarks/forward_backward.py, SDAR-1.7B shape (random weights, bf16), seq 4096 per stream,
#                FlexAttention then SDPA (if SDPA fails at 4096, both again at 2048); model FLOPs utilisation
#   fb_moe_*     the same for SDAR-30B-A3B's shape with 4 layers, grouped experts then SequentialMLP
#   rollout_speed  benchmarks/rollout.py --speed: SDAR-1.7B shape (random, bf16), batch 64, 256 tokens, block 4,
#                threshold 0.9: no cache, cache on the host loop (before), cache on the device loop, and
#                transformers' model with its KV cache decoding the same prompts (tokens/s, forwards/token)
#   weight_sync  benchmarks/weight_sync.py at TP=1 x EP=1 (one GPU: one process), 1.28 GB fp32 model
#   rollout      benchmarks/rollout.py (trains the small model 300 steps, then cache / no cache, static / dynamic)
#   rollout_masked  benchmarks/rollout.py --masked: LLaDA-8B's shape with 4 layers (random weights, bf16), batch
#                32, 256 tokens, block 32: uncached vs Fast-dLLM's prefix / dual cache, fixed steps vs
#                threshold 0.9 (tokens/s, forwards per token; DARE reports 2.2x for the cache)
#   memory_*     benchmarks/memory.py: the memory plan vs torch.cuda.max_memory_allocated per phase, and the
#                offload's seconds, for the SDAR-1.7B shape and SDAR-30B-A3B's with 4 layers
#   rl_step      benchmarks/rl_step.py, cached+packed vs nocache+padded, 3 steps, 1024-token responses
#   replay       benchmarks/replay.py: the trainer's replay of SGLang trajectories against the rollout it replays
#
# Output, flat in $OUT (default outputs/gpu_checks): gpu_checks.log (every step's output, appended as it
# runs), summary.txt (one line per step: exit status, seconds, PASS/FAIL/SKIP), results.json (every JSON
# result of this run, by file name). Variables: GPU_CHECKS_BUDGET (seconds for all steps, default 560),
# GPU_CHECKS_ONLY / GPU_CHECKS_SKIP (comma-separated step names), GPU_CHECKS_SMOKE=1.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/outputs/gpu_checks}
mkdir -p "$OUT"
SMOKE=${GPU_CHECKS_SMOKE:-0}
BUDGET=${GPU_CHECKS_BUDGET:-560}
ONLY=${GPU_CHECKS_ONLY:-}
SKIP=${GPU_CHECKS_SKIP:-}
START=$(date +%s)
WORK=$(mktemp -d /tmp/gpu_checks.XXXXXX)
RES=$WORK/results
mkdir -p "$RES"
LOG=$OUT/gpu_checks.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" DARE_MEGA_CACHE=$WORK/cache
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}

elapsed() { echo $(($(date +%s) - START)); }

wanted() {  # wanted NAME: not excluded by GPU_CHECKS_ONLY / GPU_CHECKS_SKIP
    if [[ -n $ONLY && ",$ONLY," != *",$1,"* ]]; then return 1; fi
    if [[ ",$SKIP," == *",$1,"* ]]; then return 1; fi
    return 0
}

verdict() {  # verdict RC LOGFILE
    if [[ $1 == 124 || $1 == 137 ]]; then echo "TIMEOUT"
    elif [[ $1 != 0 ]]; then echo "FAIL"
    elif grep -q '^FAIL' "$2"; then echo "FAIL"
    else echo "PASS"; fi
}

limit_for() {  # limit_for CAP: the cap, or what is left of the budget; empty when under 30 s are left
    local left=$((BUDGET - $(elapsed)))
    ((left < 30)) && return 0
    echo $(($1 < left ? $1 : left))
}

step() {  # step NAME CAP COMMAND...: run in the foreground, output to the log as it comes
    local name=$1 cap=$2 limit
    shift 2
    wanted "$name" || return 0
    limit=$(limit_for "$cap")
    if [[ -z $limit ]]; then
        printf '%-16s SKIP (budget spent at +%ss)\n' "$name" "$(elapsed)" | tee -a "$SUMMARY" >>"$LOG"
        return 0
    fi
    printf '\n===== %s (limit %ss, at +%ss): %s\n' "$name" "$limit" "$(elapsed)" "$*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$(verdict "$rc" "$WORK/$name.log")" \
        | tee -a "$SUMMARY" "$LOG"
    return "$rc"
}

BG_NAMES=()
BG_PIDS=()
BG_T0=()
step_bg() {  # step_bg NAME CAP COMMAND...: run in the background, output to the log when it ends (step_wait)
    local name=$1 cap=$2 limit
    shift 2
    wanted "$name" || return 0
    limit=$(limit_for "$cap")
    if [[ -z $limit ]]; then
        printf '%-16s SKIP (budget spent at +%ss)\n' "$name" "$(elapsed)" | tee -a "$SUMMARY" >>"$LOG"
        return 0
    fi
    printf '\n===== %s started in the background (limit %ss, at +%ss): %s\n' "$name" "$limit" "$(elapsed)" "$*" \
        | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1 &
    BG_PIDS+=($!)
    BG_NAMES+=("$name")
    BG_T0+=("$(date +%s)")
}

step_wait() {
    local i rc
    for i in "${!BG_PIDS[@]}"; do
        wait "${BG_PIDS[$i]}"
        rc=$?
        printf '\n===== %s (background) output:\n' "${BG_NAMES[$i]}" >>"$LOG"
        cat "$WORK/${BG_NAMES[$i]}.log" >>"$LOG"
        tail -n 25 "$WORK/${BG_NAMES[$i]}.log"
        printf '%-16s rc=%-3s %4ss  %s\n' "${BG_NAMES[$i]}" "$rc" "$(($(date +%s) - BG_T0[i]))" \
            "$(verdict "$rc" "$WORK/${BG_NAMES[$i]}.log")" | tee -a "$SUMMARY" "$LOG"
    done
    BG_PIDS=()
    BG_NAMES=()
    BG_T0=()
}

collect() {  # every JSON result of this run -> $OUT/results.json
    "$PY" - "$RES" "$OUT/results.json" <<'EOF'
import json, os, sys
res, out = sys.argv[1], sys.argv[2]
merged = {}
for name in sorted(os.listdir(res)):
    if name.endswith(".json"):
        try:
            merged[name[:-5]] = json.load(open(os.path.join(res, name)))
        except ValueError as e:
            merged[name[:-5]] = {"unreadable": str(e)}
json.dump(merged, open(out, "w"), indent=1)
print(f"results.json: {', '.join(merged) or 'no results'}")
EOF
}

if [[ $SMOKE == 1 ]]; then
    FB_PRESET=tiny-sdar FB_LEN=128 FB_LEN2=64 FB_STEPS=(--steps 1 --warmup 1) FB_ATTN=(sdpa)
    WS_ARGS=(--layers 1 --experts 4 --repeat 1 --bucket-mb 16)
    IPC_ARGS=(--layers 1 --hidden 128 --bucket-mb 4)
    RO_ARGS=(--train-steps 5 --new-tokens 16 --batch 2)
    ROM_ARGS=(--masked tiny-llada --train-steps 0 --new-tokens 16 --batch 2)
    RL_ARGS=(--steps 2 --prompts 1 --n 2 --max-new-tokens 16 --threads 2)
    MOE_PRESET=tiny-sdar-moe MOE_LEN=64 MOE_LAYERS=2
    SPEED_ARGS=(--speed tiny-sdar-moe --batch 4 --new-tokens 16 --dtype float32)
    RP_ARGS=(--train-steps 5 --new-tokens 16 --batch 2)
    MEM_DENSE=(--preset tiny-sdar --tokens 64 --new-tokens 8 --rows 2)
    MEM_MOE=(--preset tiny-sdar-moe --tokens 64 --new-tokens 8 --rows 2)
else
    FB_PRESET=sdar-1.7b-chat FB_LEN=4096 FB_LEN2=2048 FB_STEPS=(--steps 5 --warmup 2) FB_ATTN=(flex sdpa)
    WS_ARGS=(--repeat 2)
    IPC_ARGS=()
    RO_ARGS=()
    ROM_ARGS=(--masked llada-8b-instruct --layers 4 --dtype bfloat16 --batch 32 --new-tokens 256 --train-steps 0)
    RL_ARGS=(--steps 3 --max-new-tokens 1024)
    MOE_PRESET=sdar-30b-a3b-chat MOE_LEN=4096 MOE_LAYERS=4
    SPEED_ARGS=(--speed sdar-1.7b-chat --batch 64 --new-tokens 256 --dtype bfloat16)
    RP_ARGS=(--train-steps 100 --batch 32)
    MEM_DENSE=(--preset sdar-1.7b-chat --tokens 4096 --new-tokens 256 --rows 16)
    MEM_MOE=(--preset sdar-30b-a3b-chat --layers 4 --tokens 4096 --new-tokens 256 --rows 16)
fi

# ---- a. environment ---------------------------------------------------------------------------------
step env 60 bash -c "
    (command -v nvidia-smi >/dev/null && nvidia-smi) || echo 'no nvidia-smi'
    $PY - <<'EOF'
import platform, sys
import torch, transformers
print('python', sys.version.split()[0], platform.machine(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__)
print('cuda available:', torch.cuda.is_available(), '| devices:', torch.cuda.device_count(),
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
import dare_mega, megatron.core
print('dare_mega', dare_mega.__version__, dare_mega.__file__, '| megatron.core', megatron.core.__version__)
try:
    import math_verify, triton
    print('math_verify ok | triton', triton.__version__)
except ImportError as e:
    print('optional import missing:', e)
EOF"
if [[ $? != 0 ]] && wanted env; then
    echo "FAIL: python or the imports do not work; nothing else can run" | tee -a "$LOG" "$SUMMARY"
    collect
    exit 1
fi

# ---- b. correctness on the GPU (side by side) --------------------------------------------------------
# the two tests that failed on the last GPU run, alone first, with their failure text and FlexAttention's
# recompilations in the log (a suspect: a compile per new sequence length under the old 120 s test limit)
step cuda_replay 200 env TORCH_LOGS=recompiles "$PY" -m pytest -q -p no:cacheprovider --timeout=180 -rfE -vv \
    --durations=5 "tests/test_rollout.py::test_replaying_the_trajectory_gives_the_rollout_log_probs"
step_bg parity 150 "$PY" benchmarks/cuda_parity.py --out "$RES/parity.json"
step_bg pytest 200 "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 --timeout=180 -rfE \
    tests/test_rollout.py tests/test_rl_algorithms.py tests/test_masks.py tests/test_grouped_experts.py \
    tests/test_sync_free_decoding.py tests/test_sft.py::test_no_attention_crosses_packed_documents
step_wait

# ---- c. CUDA-IPC weight sync to another process ------------------------------------------------------
step cuda_ipc 90 "$PY" benchmarks/cuda_ipc_check.py "${IPC_ARGS[@]}" --out "$RES/cuda_ipc.json"

# ---- d. benchmarks -----------------------------------------------------------------------------------
for attn in "${FB_ATTN[@]}"; do
    step "fb_${attn}_$FB_LEN" 120 "$PY" benchmarks/forward_backward.py --preset "$FB_PRESET" --seq-len "$FB_LEN" \
        --attention "$attn" "${FB_STEPS[@]}" --out "$RES/forward_backward-$FB_PRESET-$attn-$FB_LEN.json"
    fb_rc=$?
done
if [[ $SMOKE != 1 && ${fb_rc:-0} != 0 ]]; then  # SDPA's dense mask did not fit or failed: compare at 2048
    for attn in "${FB_ATTN[@]}"; do
        step "fb_${attn}_$FB_LEN2" 90 "$PY" benchmarks/forward_backward.py --preset "$FB_PRESET" \
            --seq-len "$FB_LEN2" --attention "$attn" "${FB_STEPS[@]}" \
            --out "$RES/forward_backward-$FB_PRESET-$attn-$FB_LEN2.json"
    done
fi
for experts in grouped sequential; do
    step "fb_moe_$experts" 120 "$PY" benchmarks/forward_backward.py --preset "$MOE_PRESET" --layers "$MOE_LAYERS" \
        --seq-len "$MOE_LEN" --experts "$experts" "${FB_STEPS[@]}" \
        --out "$RES/forward_backward-$MOE_PRESET-$MOE_LAYERS-layers-$experts.json"
done
step rollout_speed 200 "$PY" benchmarks/rollout.py "${SPEED_ARGS[@]}" --workdir "$WORK/rollout_speed" \
    --out "$RES/rollout_speed.json"
step rl_step 240 "$PY" benchmarks/rl_step.py "${RL_ARGS[@]}" --variants cached+packed,nocache+padded \
    --out "$RES/rl_step.json"
step weight_sync 90 "$PY" benchmarks/weight_sync.py --tp 1 --ep 1 "${WS_ARGS[@]}" --out "$RES/weight_sync.json"
step rollout 120 "$PY" benchmarks/rollout.py "${RO_ARGS[@]}" --workdir "$WORK/rollout" --out "$RES/rollout.json"
step rollout_masked 180 "$PY" benchmarks/rollout.py "${ROM_ARGS[@]}" --workdir "$WORK/rollout_masked" \
    --out "$RES/rollout_masked.json"
step memory_dense 90 "$PY" benchmarks/memory.py "${MEM_DENSE[@]}" --out "$RES/memory-dense.json"
step memory_moe 120 "$PY" benchmarks/memory.py "${MEM_MOE[@]}" --out "$RES/memory-moe.json"
step replay 90 "$PY" benchmarks/replay.py "${RP_ARGS[@]}" --workdir "$WORK/replay" --out "$RES/replay.json"

# ---- results -----------------------------------------------------------------------------------------
collect | tee -a "$LOG"
printf '\ntotal %ss (budget %ss)\n' "$(elapsed)" "$BUDGET" | tee -a "$SUMMARY" "$LOG"
echo "== summary"
cat "$SUMMARY"
rm -rf "$WORK"
