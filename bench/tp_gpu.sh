#!/usr/bin/env bash
# Tensor parallelism on one GPU host, in one call of at most ~555 s (2 or 4 GPUs):
#   1. bench/nccl_check.py: each collective the kit uses, 8 KiB..256 MiB, eager and in a CUDA graph
#   2. bench/tp.py, one process per TP size: 1 (saves the reference: bf16 and float32 logits), 2, 4 (when
#      4 GPUs are present); each also runs its TP size in float32 (a second engine in the same process)
#   3. the NCCL tests (tests/test_parallel_nccl.py)
#   4. the model over one GPU's budget served at TP=2 (a process of its own)
#   5. time left: TP=2 again with the step headers by broadcast (KIT_TP_CHANNEL=broadcast), the path that
#      ranks on several hosts take, against the shared-memory one of step 2
#   6. time left: TP=2 and TP=4 with the partial sums all-reduced in float32 (KIT_TP_PARTIAL_SUMS=float32)
# Every step has its own time limit inside one overall deadline; a stalled stage dumps every thread's
# stack (bench/tp.py --stage-timeout) and the ranks' watchdogs name the stuck rank and step.
#
#   bash bench/tp_gpu.sh OUT_DIR
#
# OUT_DIR receives: nccl_tests.log, tp.log (every stage line, warning and stack), tp.json (every run
# merged), tp_runs.tgz (each run's JSON, each rank's collective trace). NCCL's NVLink-multicast
# settings (NCCL_NVLS_ENABLE=0 ...) are left as the machine has them.
set -u
OUT=${1:?usage: bash bench/tp_gpu.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/tp_gpu.XXXXXX)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" KIT_TP_TRACE="$WORK/trace"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=${TP_GPU_DEADLINE_S:-540}
LOG="$OUT/tp.log"
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>>"$LOG")
echo "[tp_gpu] $(date -u +%T) GPUs: $GPUS; NCCL env: $(env | grep -E '^(NCCL_|TORCH_NCCL_|TORCH_SYMM|NVSHMEM_)' | tr '\n' ' ')" | tee -a "$LOG"
nvidia-smi topo -m >>"$LOG" 2>&1

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
step() {  # step NAME LIMIT_S LOGFILE CMD...: run under min(LIMIT, time left), SIGTERM first (stacks), KILL 15 s later
  local name=$1 limit=$2 log=$3; shift 3
  local l; l=$(left)
  (( l < limit )) && limit=$(( l - 15 ))
  if (( limit < 30 )); then echo "[tp_gpu] skip $name: ${l}s left" | tee -a "$LOG"; return 0; fi
  echo "[tp_gpu] $(date -u +%T) $name (limit ${limit}s)" | tee -a "$LOG"
  # NOTE: timeout leads a process group of its own (the step and the ranks it spawned); whatever of that
  # group outlives the step (a rank stuck in CUDA) is stopped by the group's id, so the next step has the GPUs
  timeout -s TERM -k 15 "$limit" "$@" >>"$log" 2>&1 &
  local pid=$!
  wait "$pid"
  local rc=$?
  sleep 1  # NOTE: multiprocessing's resource tracker leaves once the step has gone
  local rest; rest=$(ps -eo pid=,pgid=,args= | awk -v g="$pid" '$2 == g && !/<defunct>/' | cut -c1-150)
  if [[ -n "$rest" ]]; then
    echo "[tp_gpu] $name left processes behind, stopped now (SIGTERM dumps their stacks above):" | tee -a "$LOG"
    echo "$rest" | tee -a "$LOG"
    kill -TERM -- "-$pid" 2>/dev/null; sleep 3; kill -KILL -- "-$pid" 2>/dev/null
  fi
  tail -n 25 "$log" | grep -vE '^\s*$' | tail -n 12
  echo "[tp_gpu] $(date -u +%T) $name: exit $rc$( ((rc == 124)) && echo ' (time limit: stacks above)')" | tee -a "$LOG"
}

# NCCL's own record of each rank's collectives, written if its watchdog times one out; its init log
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000} TORCH_NCCL_DUMP_ON_TIMEOUT=1 \
  TORCH_FR_DUMP_TEMP_FILE="$WORK/nccl_flight_rank" NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT,ENV}
REF=()
step "NCCL check (each collective of the kit, 8 KiB..256 MiB, eager and graphed)" 80 "$LOG" \
  $PY bench/nccl_check.py --op-timeout 20 ${TP_GPU_EXTRA:-} --out "$WORK/nccl_check.json"
B="bench/tp.py --stage-timeout 90 ${TP_GPU_EXTRA:-}"  # TP_GPU_EXTRA=--smoke: a dry run on the CPU
step "TP=1 (reference)" 100 "$LOG" $PY $B --sizes 1 --no-fit --save-ref "$WORK/ref.pt" --out "$WORK/tp1.json"
[[ -f "$WORK/ref.pt" ]] && REF=(--ref "$WORK/ref.pt")
step "TP=2" 140 "$LOG" $PY $B --sizes 2 --no-fit ${REF[@]+"${REF[@]}"} --out "$WORK/tp2.json"
if (( GPUS >= 4 )); then
  step "TP=4" 150 "$LOG" $PY $B --sizes 4 --no-fit ${REF[@]+"${REF[@]}"} --out "$WORK/tp4.json"
fi
KIT_TP_TRACE="$WORK/trace_nccl_tests" step "NCCL tests" 150 "$OUT/nccl_tests.log" \
  $PY -m pytest -q -m gpu -p no:cacheprovider -o faulthandler_timeout=120 tests/test_parallel_nccl.py
step "fit: over one GPU's budget at TP=2" 110 "$LOG" $PY $B --fit-only --out "$WORK/fit.json"
KIT_TP_CHANNEL=broadcast step "TP=2, step headers by broadcast" 90 "$LOG" \
  $PY $B --sizes 2 --no-fit --no-fp32 ${REF[@]+"${REF[@]}"} --out "$WORK/tp2_broadcast.json"
for n in 2 4; do  # the partial sums all-reduced in float32 (KIT_TP_PARTIAL_SUMS=float32) against bf16 (the default)
  (( GPUS >= n )) && KIT_TP_PARTIAL_SUMS=float32 step "TP=$n, float32 partial sums" 70 "$LOG" \
    $PY $B --sizes $n --no-fit --no-fp32 ${REF[@]+"${REF[@]}"} --out "$WORK/tp${n}_float32_sums.json"
done

$PY - "$WORK" "$OUT/tp.json" <<'EOF' 2>>"$LOG"
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
merged = {"runs": [], "files": {}}
check = os.path.join(work, "nccl_check.json")
merged["nccl_check"] = json.load(open(check)) if os.path.exists(check) else "missing (see tp.log)"
for name in ("tp1", "tp2", "tp4", "fit", "tp2_broadcast", "tp2_float32_sums", "tp4_float32_sums"):
    path = os.path.join(work, name + ".json")
    if not os.path.exists(path):
        merged["files"][name] = "missing (not run, or it did not finish: see tp.log)"
        continue
    r = json.load(open(path))
    merged["files"][name] = {"wall_s": r.get("wall_s"), "stages": r.get("stages")}
    for k in ("device", "num_gpus", "torch", "model", "dtype", "context", "steps", "max_batch", "nccl_env"):
        merged.setdefault(k, r.get(k))
    merged["runs"] += r.get("runs", [])
    if name == "fit":
        merged["fit"] = r.get("fit")
json.dump(merged, open(out, "w"), indent=2)
for row in merged["runs"]:
    print(json.dumps({k: v for k, v in row.items() if k != "cuda_graphs"}))
print("fit:", json.dumps(merged.get("fit")))
EOF
tar -czf "$OUT/tp_runs.tgz" --exclude=./ref.pt -C "$WORK" . 2>>"$LOG"  # ref.pt: TP=1 logits, 66 MB for 8B
echo "[tp_gpu] $(date -u +%T) done in $(( $(date +%s) - START ))s -> $OUT"
