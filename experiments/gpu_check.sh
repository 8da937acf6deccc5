#!/usr/bin/env bash
# One prepared GPU check of mcu-jax's speed, beside the authors' PyTorch release, for a session
# with 15 minutes of device time (this script stops itself after BUDGET_S, default 540 s).
#
# First (when a wanted part trains a curve), about 15 s: check_pointwise.py --checks
# curve-point, the curve point's kernel (mcu_jax/combine.py), which every curve step on a
# GPU runs, against XLA's sums; if it fails, every part below runs with --combine xla
# (summary.md says so).
# What it runs, most important first (each part is skipped, and logged as skipped, when the
# time left is below its estimate; ONLY="name name" runs just the named parts):
#   f32          float32, no mask: curve step (200 steps) + 20-point sweep over 6,000 images
#                (the step forms the curve point's weight tensors in one Pallas kernel,
#                mcu_jax/combine.py, since 2026-12-07; combine_xla times the kernel's
#                effect on pointwise_step)
#   profile      f32 again (compiled programs come from the persistent cache) with a
#                jax.profiler trace of the timed regions only (50 steps, one sweep);
#                experiments/profile_summary.py's table goes into summary.md, each timed
#                region's traces into $OUT/profile_<region>.tgz when it is under 16 MB
#   fused        f32's curve step with --fused-bn (BatchNorm + ReLU with a hand-written
#                backward pass; compare with f32's step) to decide the models' fused_bn
#   sweep_map    f32's sweep under lax.map over t with 16 BatchNorm batches at once and
#                evaluation batches of 2,000 (dense convolutions, where vmap over t makes
#                them grouped; compare with f32's sweep) to decide resolve_strategy and the
#                default bn_group on GPUs
#   pointwise_check  check_pointwise.py --checks pointwise: the fused 1x1 kernel's Pallas (Triton)
#                builds, forward and backward, the fused 3x3 kernel's, bn_input's and the
#                chain kernel's, in float32 and bfloat16, on this card against XLA's ops,
#                and a PreResNet with them against
#                the default model, outputs and gradients (exit status 1 if a difference is
#                above the tolerance)
#   pointwise_step  f32's curve step with PreResNet's 1x1 convolutions as the fused kernel
#                and its backward kernel (--pointwise fused; compare with f32's step):
#                compiled for an H100, 10.9 GB in 806 kernels against 18.0 GB in 1,661
#   conv3x3_step  pointwise_step with the stride-1 3x3 convolutions as the fused 3x3 kernel
#                and its backward kernel too (--conv3x3 fused; compare with pointwise_step's)
#                to decide ProblemConfig.conv3x3: compiled for an H100, 5.01 ms by the
#                two-term estimate against pointwise_step's 6.45 ms
#   pointwise_bf16  the sweep in bfloat16 with every sweep option that the two-term model
#                favours: the fused 1x1 kernel, BatchNorm folded for evaluation, lax.map over
#                t with all 46 BatchNorm batches at once and evaluation batches of 6,000
#                (1.01 s estimated, against the 1.1 s target; compare with bf16's sweep);
#                folded, each block's conv3 and the next block's conv1 run as one kernel
#                (mcu_jax/models/chain.py)
#   conv3x3_bf16  pointwise_bf16 with the fused 3x3 kernel too (--conv3x3 fused: the stride-1
#                3x3 convolutions with bn2 + ReLU before them and bn3's statistics after
#                them, mcu_jax/models/conv3x3.py; 0.93 s estimated; compare with
#                pointwise_bf16's) to decide SelectionConfig.conv3x3
#   unfolded_bf16  conv3x3_bf16 without --fold-bn, so without the chain kernel (1.04 s
#                estimated; compare with conv3x3_bf16's) to decide SelectionConfig.fold_bn
#                with the kernels
#   pointwise    sweep_map's sweep with PreResNet's 1x1 convolutions as the fused kernel
#                (--pointwise fused; compare with sweep_map's) to decide
#                SelectionConfig.pointwise: compiled for an H100, 0.58 of the BatchNorm pass's
#                bytes and 0.66 of evaluation's
#   reference    the authors' release on the same workload (reference_peer.py: 100 steps, 3 t)
#   e2e          float32, end-to-end MCU phase of the CIFAR-10 protocol (D_r 45,000,
#                D_f 5,000, test 10,000, 10 epochs, paper mask k=0.5, k_r=0.1, 20 t);
#                over 250 s on an H100 on 2026-11-27, so it often needs a call of its own
#   e2e_warm     e2e again on e2e's filled compilation cache (a later MCU row's cost)
#   e2e_pre      e2e with the sweep programs compiled in a background thread (--precompile)
#   e2e_fast     e2e with every speed option: bfloat16, --fused-bn, --fold-bn (or
#                $FAST_OPTIONS), --precompile
#                (whether the 60 s target can be met at all; bfloat16's accuracy is
#                gpu_accuracy.sh's question)
#   e2e_fast_warm  e2e_fast again on its filled compilation cache
#   f32_k01      float32, mask k = k_r = 0.1: curve step only (paper: ~75% faster epochs)
#   combine_xla  pointwise_step with the curve point's weight tensors summed by XLA, one
#                kernel each (--combine xla; compare with pointwise_step, which runs the
#                kernel): 110 kernels more by the model (skipped when the first check
#                failed, since every part then runs so)
#   fold         sweep_map's sweep with BatchNorm folded into the convolutions for
#                evaluation (--fold-bn; compare with sweep_map's) to decide
#                SelectionConfig.fold_bn: compiled for an H100, folding saves bytes with dense
#                convolutions only (under vmap over t the program moves the same bytes)
#   bf16         bfloat16, no mask: curve step + sweep
#   pointwise_step_bf16  pointwise_step in bfloat16 (compare with bf16's step)
#   conv3x3_step_bf16  conv3x3_step in bfloat16 (compare with pointwise_step_bf16's; 3.50 ms
#                estimated against 4.72 ms)
#   strategies   the sweep under map, vmap and vmap in chunks of 5 (checks resolve_strategy)
#   bf16_k01     bfloat16, mask k = k_r = 0.1: curve step only
#   f32_paper    float32, paper mask k=0.5, k_r=0.1: curve step only
#   cmdbuf       f32 curve step with XLA command buffers (CUDA graphs) also over while loops
#                and conditionals (XLA_FLAGS=$CMDBUF_FLAGS; slower on 2026-11-27)
#   cost         experiments/cost_analysis.py: XLA's FLOP and byte counts with GPU fusion,
#                and how many convolutions got a fused cuDNN epilogue with BN folded or not
#                (its bytes and kernels can also be had without a GPU: --gpu-target)
#
# Before the call (on the development machine, in the repository root):
#   1. Put the authors' release (TIML-Group/Mode-Connectivity-Unlearning, commit ff1f215: its
#      curves.py, unlearn.py, utils.py and models/) in the git-ignored folder
#      reference_release/, and copy the timing script beside it:
#        cp ../shared/bench/reference_peer.py reference_release/
#      (../shared does not travel to the device machine; PEER=path overrides the script's
#      location.) The script writes reference_release/config/baseline_results.yml when absent.
#      Never commit the release: /reference_release/ is in .gitignore.
#   2. The release needs torch, scipy, pyyaml, tqdm, and mcu-jax needs jax with CUDA, flax,
#      optax, orbax-checkpoint, chex, scipy, scikit-learn, tqdm: the device image's python3
#      has all of them (jax 0.11 with the CUDA 13 plugin, torch 2.11). Elsewhere, install them
#      first (pip install -e '.[cuda12]' torch scipy pyyaml tqdm); if jax sees no GPU the
#      script installs wheels carried in .whl/ or, where a network exists, jax[cuda12].
#
# The call (device tool): command "bash experiments/gpu_check.sh", carry ["reference_release"],
# timeout_s 600. Results land in $OUT (default runs/gpu_check), at most 8 files:
#   summary.md    every part's table as it finishes, then the targets and the ratios
#   parts.jsonl   one JSON line per finished part (the benchmark's --json output)
#   reference.json, log.txt, env.txt (versions, nvidia-smi), profile_<region>.tgz (at most 2)
# A part stopped by the budget is marked so in summary.md (its JSON is then missing).
# Time: the machine's start (1-2 minutes) counts against the session's 15 minutes, so set
# BUDGET_S to the call's timeout_s minus about 45 s, and timeout_s to what status's
# budget_left_s allows; e2e alone is estimated at 300 s and is skipped with less.
# experiments/gpu_summary.py OUT rebuilds the targets/ratios section from parts.jsonl and
# reference.json. Check this file with: bash -n experiments/gpu_check.sh
# Dry run of the flow on CPU (tiny sizes, minutes; --scan takes the accelerator code path):
#   REQUIRE_GPU=0 PY=.venv/bin/python OUT=/tmp/gc EXTRA_ARGS="--model cnn_small \
#   --train-images 1437 --steps 20 --num-t 4 --sweep-images 256 --retain 1293 --forget 144 \
#   --test 360 --epochs 1 --scan" PEER_ARGS="n_train=300 batch=16 steps=3 n_eval=64 nt=2" \
#   PY_REF=/path/to/python-with-torch bash experiments/gpu_check.sh
# (with --model cnn_small the benchmark parts pointwise, pointwise_bf16, conv3x3_bf16,
# pointwise_step, pointwise_step_bf16, conv3x3_step and conv3x3_step_bf16, and e2e_fast with FAST_OPTIONS="--pointwise fused", stop at the
# benchmark's argument check: the kernel is PreResNet's)
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT=${OUT:-$REPO/runs/gpu_check}
BUDGET_S=${BUDGET_S:-540}
PY=${PY:-python3}
PY_REF=${PY_REF:-$PY}
RELEASE=${RELEASE:-reference_release}
ONLY=${ONLY:-}
COMBINE_FALLBACK=  # set when the curve point's kernel fails its check (below)
PEER_ARGS=${PEER_ARGS:-steps=100 nt=3}
CMDBUF_FLAGS=${CMDBUF_FLAGS:---xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.md
PARTS=$OUT/parts.jsonl
# Identical programs (the profile part's, say) compile once across the parts' processes.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$LOG"
: >"$SUMMARY"
: >"$PARTS"

log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

# Enough time left for a part estimated at $2 seconds? Prints the seconds left.
time_left() {
  local left=$((BUDGET_S - SECONDS))
  if ((left < $2)); then
    log "skip $1: ${left}s left, it needs about $2s"
    return 1
  fi
  echo "$left"
}

gpu_backend() { $PY -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >>"$LOG" 2>&1; }

# 1. JAX on the GPU (REQUIRE_GPU=0 skips this, for a dry run of the script's flow on CPU with
#    small sizes appended to every benchmark call by EXTRA_ARGS; later arguments win)
if [ "${REQUIRE_GPU:-1}" != 0 ] && ! gpu_backend; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    log "jax sees no GPU: installing the wheels carried in .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  elif [ "${ALLOW_NETWORK:-0}" = 1 ]; then
    log "jax sees no GPU: trying pip install jax[cuda12] (ALLOW_NETWORK=1)"
    timeout 180 $PY -m pip install -q "jax[cuda12]>=0.10,<0.13" >>"$LOG" 2>&1
  fi
  if ! gpu_backend; then
    log "no GPU backend for jax; stopping (see log.txt)"
    exit 1
  fi
fi
{
  $PY -c 'import importlib.metadata as m, platform
print("python", platform.python_version())
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
          "orbax-checkpoint", "chex", "numpy", "torch"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        pass
import jax; print("devices", jax.devices())'
  nvidia-smi
} >"$OUT/env.txt" 2>&1
grep -E "^(jax|flax|torch|devices) " "$OUT/env.txt" | tee -a "$LOG"

# The curve point's kernel (mcu_jax/combine.py) runs in every curve step on a GPU: if it does
# not build or does not sum what XLA sums on this card, every part runs with XLA's sums
# (--combine xla) instead, so that the kernel cannot cost the call its measurements.
# (parts without a curve step need no check; cost compiles one, but only to count it: its
# script takes no --combine, so the fallback could not reach it anyway)
if [ -z "$ONLY" ] || [ -n "$(printf '%s\n' $ONLY | grep -vxE \
    'reference|sweep_map|pointwise|pointwise_bf16|conv3x3_bf16|unfolded_bf16|fold|strategies|cost|pointwise_check')" ]; then
  if timeout 120 $PY experiments/check_pointwise.py --checks curve-point >>"$LOG" 2>&1; then
    log "the curve point's kernel matches XLA's sums"
  else
    log "the curve point's kernel failed its check (log.txt): every part runs with --combine xla"
    echo "- the curve point's kernel failed its check: every part ran with --combine xla" \
      >>"$SUMMARY"
    EXTRA_ARGS="${EXTRA_ARGS:-} --combine xla"
    COMBINE_FALLBACK=1
  fi
fi

# 2. parts
bench() {  # name, estimated seconds, benchmark arguments... (XLA_FLAGS from $FLAGS; the
  # persistent compilation cache folder from $CACHE, default the one shared by all parts)
  local name=$1 need=$2 left rc
  shift 2
  wanted "$name" || return 0
  left=$(time_left "$name" "$need") || return 0
  log "run $name: ${FLAGS:+XLA_FLAGS='$FLAGS' }experiments/benchmark.py $*"
  # shellcheck disable=SC2086 # EXTRA_ARGS is a list of words
  XLA_FLAGS="${FLAGS:-${XLA_FLAGS:-}}" \
    JAX_COMPILATION_CACHE_DIR="${CACHE:-$JAX_COMPILATION_CACHE_DIR}" \
    timeout "$left" $PY experiments/benchmark.py "$@" \
    ${EXTRA_ARGS:-} --json "$WORK/$name.json" >"$WORK/$name.txt" 2>>"$LOG"
  rc=$?
  {
    echo "## $name"
    echo
    cat "$WORK/$name.txt"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      echo "(stopped by the budget after ${left}s; the rows above are what it printed)"
    fi
    echo
  } >>"$SUMMARY"
  if [ -f "$WORK/$name.json" ]; then
    $PY -c 'import json, sys
print(json.dumps({"part": sys.argv[1], "xla_flags": sys.argv[2], **json.load(open(sys.argv[3]))},
                 default=str))' "$name" "${FLAGS:-}" "$WORK/$name.json" >>"$PARTS"
  fi
  log "done $name (exit $rc)"
}

reference() {
  local peer="" left c
  wanted reference || return 0
  for c in "${PEER:-}" "$RELEASE/reference_peer.py" shared/bench/reference_peer.py \
    ../shared/bench/reference_peer.py; do
    if [ -n "$c" ] && [ -f "$c" ]; then peer=$c; break; fi
  done
  if [ ! -f "$RELEASE/curves.py" ] || [ -z "$peer" ]; then
    log "skip reference: needs the release in $RELEASE/ and reference_peer.py (see header)"
    return 0
  fi
  if [ "${REQUIRE_GPU:-1}" != 0 ] &&
    ! $PY_REF -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >>"$LOG" 2>&1; then
    log "skip reference: torch sees no CUDA device (it would time the release on the CPU)"
    return 0
  fi
  left=$(time_left reference 90) || return 0
  mkdir -p "$RELEASE/config"
  [ -f "$RELEASE/config/baseline_results.yml" ] ||
    echo "cifar10: {random: {train: 100.0, val: 90.0}}" >"$RELEASE/config/baseline_results.yml"
  log "run reference: $peer $RELEASE $PEER_ARGS"
  # shellcheck disable=SC2086 # PEER_ARGS is a list of words
  timeout "$left" $PY_REF "$peer" "$RELEASE" $PEER_ARGS >"$OUT/reference.json" 2>>"$LOG"
  log "done reference (exit $?): $(cat "$OUT/reference.json")"
}

profile() {
  wanted profile || return 0
  time_left profile 60 >/dev/null || return 0
  # Same programs as f32 (same shapes and steps per call): the persistent cache compiles
  # nothing; only the timed regions are traced (benchmark.py --profile).
  bench profile 60 --model preresnet110 --batch-size 128 --steps 50 --warmup 0 --num-t 20 \
    --sweep-images 6000 --profile "$WORK/profile"
  if [ -d "$WORK/profile" ]; then
    $PY experiments/profile_summary.py "$WORK/profile" >>"$SUMMARY" 2>>"$LOG" ||
      log "profile_summary.py failed"
    # One archive per timed region (curve_step, sweep), so one oversized trace does not
    # cost the other its way back (16 MB per file comes back).
    local region tgz
    for region in "$WORK"/profile/*/; do
      region=$(basename "$region")
      tgz=$OUT/profile_$region.tgz
      if [ -z "$(find "$WORK/profile/$region" -name '*.trace.json.gz' -print -quit)" ]; then
        log "no trace files for region $region"
        continue
      fi
      (cd "$WORK" && find "profile/$region" -name '*.trace.json.gz' -print0 |
        tar --null -czf "$tgz" -T -) 2>>"$LOG" || log "no archive for region $region"
      if [ -f "$tgz" ] && [ "$(stat -c %s "$tgz")" -gt 16000000 ]; then
        log "$(basename "$tgz") is over 16 MB and would not come back; removed"
        rm -f "$tgz"
      fi
    done
  fi
}

run_script() {  # name, estimated seconds, a Python script and its arguments: output to summary.md
  local name=$1 need=$2 left rc
  shift 2
  wanted "$name" || return 0
  left=$(time_left "$name" "$need") || return 0
  log "run $name: $*"
  { echo "## $name"; echo; timeout "$left" $PY "$@"; rc=$?; echo; } >>"$SUMMARY" 2>>"$LOG"
  log "done $name (exit $rc)"
}

STD=(--model preresnet110 --batch-size 128 --steps 200 --warmup 10)
bench f32 150 "${STD[@]}" --dtype float32 --mask none --num-t 20 --sweep-images 6000
profile  # right after f32, whose compiled programs it reuses: where the step's time goes
bench fused 70 "${STD[@]}" --dtype float32 --mask none --skip-sweep --fused-bn
DENSE=(--model preresnet110 --dtype float32 --skip-step --num-t 20 --sweep-images 6000
  --strategy map --bn-group 16 --eval-batch-size 2000)
bench sweep_map 70 "${DENSE[@]}"
run_script pointwise_check 190 experiments/check_pointwise.py --checks pointwise
bench pointwise_step 70 "${STD[@]}" --dtype float32 --mask none --skip-sweep --pointwise fused
bench conv3x3_step 70 "${STD[@]}" --dtype float32 --mask none --skip-sweep --pointwise fused \
  --conv3x3 fused
BEST_SWEEP=(--model preresnet110 --dtype bfloat16 --skip-step --num-t 20 --sweep-images 6000
  --strategy map --bn-group 46 --eval-batch-size 6000 --pointwise fused)
bench pointwise_bf16 70 "${BEST_SWEEP[@]}" --fold-bn
# the same with the fused 3x3 kernel in the BatchNorm pass (0.93 s by the estimate, against
# pointwise_bf16's 1.01 s): its ratio needs pointwise_bf16 in the same call
bench conv3x3_bf16 70 "${BEST_SWEEP[@]}" --fold-bn --conv3x3 fused
# conv3x3_bf16 unfolded: no chain kernel (1.04 s by the estimate); its ratio needs
# conv3x3_bf16 in the same call
bench unfolded_bf16 70 "${BEST_SWEEP[@]}" --conv3x3 fused
bench pointwise 70 "${DENSE[@]}" --pointwise fused
reference
# Each end-to-end part compiles from an empty cache of its own: compilation is part of what
# they measure, and e2e_pre must not load what e2e compiled.
CACHE=$WORK/cache_e2e bench e2e 300 --model preresnet110 --dtype float32 --mask paper --skip-step --skip-sweep \
  --end-to-end --retain 45000 --forget 5000 --test 10000 --epochs 10 --num-t 20
# The same run again on e2e's (now filled) cache: what every later MCU row of an experiment
# (same model and sizes, other method, mode or seed) costs once its programs are compiled.
if [ -f "$WORK/e2e.json" ]; then
  CACHE=$WORK/cache_e2e bench e2e_warm 200 --model preresnet110 --dtype float32 --mask paper \
    --skip-step --skip-sweep --end-to-end --retain 45000 --forget 5000 --test 10000 \
    --epochs 10 --num-t 20
elif wanted e2e_warm; then
  log "skip e2e_warm: e2e did not finish in this call, so its cache is not warm"
fi
CACHE=$WORK/cache_e2e_pre bench e2e_pre 300 --model preresnet110 --dtype float32 --mask paper --skip-step --skip-sweep \
  --end-to-end --retain 45000 --forget 5000 --test 10000 --epochs 10 --num-t 20 --precompile
# FAST_OPTIONS: e2e_fast's options beyond bfloat16 and --fused-bn, --fold-bn unless set (e.g.
# to "--fold-bn --pointwise fused", the kernel in training and the sweep, once the
# pointwise parts have won)
# shellcheck disable=SC2206 # FAST_OPTIONS is a list of words
FAST=(--model preresnet110 --dtype bfloat16 --fused-bn --mask paper --skip-step --skip-sweep
  --end-to-end --retain 45000 --forget 5000 --test 10000 --epochs 10 --num-t 20
  ${FAST_OPTIONS---fold-bn} --precompile)
CACHE=$WORK/cache_e2e_fast bench e2e_fast 300 "${FAST[@]}"
if [ -f "$WORK/e2e_fast.json" ]; then
  CACHE=$WORK/cache_e2e_fast bench e2e_fast_warm 200 "${FAST[@]}"
elif wanted e2e_fast_warm; then
  log "skip e2e_fast_warm: e2e_fast did not finish in this call, so its cache is not warm"
fi
bench f32_k01 80 "${STD[@]}" --dtype float32 --mask 0.1 --skip-sweep
if [ -z "${COMBINE_FALLBACK:-}" ]; then
  bench combine_xla 70 "${STD[@]}" --dtype float32 --mask none --skip-sweep --pointwise fused \
    --combine xla
elif wanted combine_xla; then
  log "skip combine_xla: every part ran with --combine xla already"
fi
bench fold 90 "${DENSE[@]}" --fold-bn
bench bf16 140 "${STD[@]}" --dtype bfloat16 --mask none --num-t 20 --sweep-images 6000
bench pointwise_step_bf16 70 "${STD[@]}" --dtype bfloat16 --mask none --skip-sweep \
  --pointwise fused
bench conv3x3_step_bf16 70 "${STD[@]}" --dtype bfloat16 --mask none --skip-sweep \
  --pointwise fused --conv3x3 fused
bench strategies 150 --model preresnet110 --dtype float32 --skip-step --num-t 20 \
  --sweep-images 6000 --compare-strategies --chunk-size 5
bench bf16_k01 80 "${STD[@]}" --dtype bfloat16 --mask 0.1 --skip-sweep
bench f32_paper 80 "${STD[@]}" --dtype float32 --mask paper --skip-sweep
FLAGS=$CMDBUF_FLAGS bench cmdbuf 70 "${STD[@]}" --dtype float32 --mask none --skip-sweep
run_script cost 90 experiments/cost_analysis.py

# 3. targets and ratios to the release
$PY experiments/gpu_summary.py "$OUT" 2>>"$LOG" | tee -a "$SUMMARY"
rm -rf "$WORK"
log "finished in ${SECONDS}s; results in $OUT"
if [ ! -s "$PARTS" ]; then
  log "no part produced results (see log.txt)"
  exit 1
fi
