#!/usr/bin/env bash
# The bfloat16 accuracy check of issue 7 on a GPU: the quick CIFAR-10 config
# (cifar10_resnet20_random, one seed, NegGrad+ and MCU_beta on top of it) run once in float32
# and once in bfloat16, and every accuracy of the two tables compared (target: no metric moves
# by more than 0.5 points).
#
# Before the call (development machine, repository root): copy the data into the git-ignored
# data_local/ folder, which the call must carry (../shared does not travel):
#   mkdir -p data_local && cp ../shared/data/cifar10_jpeg.npz data_local/
# The call (device tool): command "bash experiments/gpu_accuracy.sh", carry ["data_local"],
# timeout_s 600. One dtype of the quick config is estimated at 4-5 minutes on an H100 (about
# half of it compilation), so DTYPES="float32" and DTYPES="bfloat16" in two calls fit better
# than both in one; results_<dtype>.json in $OUT from both calls are then compared here with
#   python experiments/compare_runs.py results_float32.json results_bfloat16.json --tolerance 0.5
# The float32 call also evaluates its own models in bfloat16 (dtype_eval.md/.json: the
# dtype's effect without retraining, whose rounding noise alone moved a CPU-scale CIFAR-10
# run by several points; docs/benchmarks.md).
# Knobs: CONFIG (default cifar10_resnet20_random), DTYPES (default "float32 bfloat16"),
# OVERRIDES (extra field=value words, e.g. "original.epochs=15 retrain.epochs=15"),
# BUDGET_S (default 545: timeout_s 600 minus a margin for the SIGTERM stop). Dry run on CPU:
#   REQUIRE_GPU=0 PY=.venv/bin/python OUT=/tmp/ga CONFIG=digits_random \
#   OVERRIDES="seeds=0 original.epochs=2 retrain.epochs=2" DATA="" bash experiments/gpu_accuracy.sh
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT=${OUT:-$REPO/runs/gpu_accuracy}
PY=${PY:-python3}
CONFIG=${CONFIG:-cifar10_resnet20_random}
DTYPES=${DTYPES:-float32 bfloat16}
BUDGET_S=${BUDGET_S:-545}
DATA=${DATA-problem.data_dir=data_local}
mkdir -p "$OUT"
LOG=$OUT/log.txt
WORK=$(mktemp -d)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$LOG"

log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

if [ "${REQUIRE_GPU:-1}" != 0 ] &&
  ! $PY -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >>"$LOG" 2>&1; then
  log "jax sees no GPU; stopping (REQUIRE_GPU=0 runs on the CPU)"
  exit 1
fi
if [ -n "$DATA" ] && [ ! -f data_local/cifar10_jpeg.npz ]; then
  log "data_local/cifar10_jpeg.npz is missing: copy ../shared/data/cifar10_jpeg.npz there and carry data_local"
  exit 1
fi
$PY -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee -a "$LOG"

for dtype in $DTYPES; do
  left=$((BUDGET_S - SECONDS))
  if ((left < 60)); then
    log "skip $dtype: ${left}s left"
    continue
  fi
  log "run $dtype: experiments/run.py $CONFIG"
  # shellcheck disable=SC2086 # DATA and OVERRIDES are lists of words
  # -k: run.py saves a checkpoint on SIGTERM and may take a while to stop; never overrun.
  timeout -k 15 "$left" $PY experiments/run.py "$CONFIG" seeds=0 methods=neggrad \
    mcu_modes=adaptive table1=False progress=False $DATA problem.dtype="$dtype" \
    out_dir="$WORK/$dtype" ${OVERRIDES:-} --compile-cache "$WORK/xla" >>"$LOG" 2>&1
  rc=$?
  log "done $dtype (exit $rc)"
  if [ -f "$WORK/$dtype/$CONFIG/results.json" ]; then
    cp "$WORK/$dtype/$CONFIG/results.json" "$OUT/results_$dtype.json"
    cp "$WORK/$dtype/$CONFIG/results.md" "$OUT/results_$dtype.md"
  fi
done
# The float32 run's own models evaluated in bfloat16 too: the dtype's effect without the
# noise of retraining (experiments/dtype_eval.py; 2 minutes for the CPU-scale config on a
# 2-core CPU). After the runs, so that it never takes the bfloat16 run's time.
if [ -d "$WORK/float32/$CONFIG/seed_0/theta_o" ]; then
  left=$((BUDGET_S - SECONDS))
  if ((left >= 30)); then
    log "run dtype_eval: the float32 models evaluated in bfloat16"
    timeout -k 5 "$left" $PY experiments/dtype_eval.py "$WORK/float32/$CONFIG/seed_0" \
      --json "$OUT/dtype_eval.json" >"$OUT/dtype_eval.md" 2>>"$LOG"
    log "done dtype_eval (exit $?: 1 when a difference is over 0.5 points)"
  else
    log "skip dtype_eval: ${left}s left"
  fi
fi
if [ -f "$OUT/results_float32.json" ] && [ -f "$OUT/results_bfloat16.json" ]; then
  $PY experiments/compare_runs.py "$OUT/results_float32.json" "$OUT/results_bfloat16.json" \
    --tolerance 0.5 | tee "$OUT/comparison.md"
fi
rm -rf "$WORK"
log "finished in ${SECONDS}s; results in $OUT"
