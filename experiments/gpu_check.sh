#!/usr/bin/env bash
# One prepared GPU check of mcu-jax's speed, beside the authors' PyTorch release, for a session
# with 15 minutes of device time (this script stops itself after BUDGET_S, default 540 s).
#
# What it runs, most important first (each part is skipped, and logged as skipped, when the
# time left is below its estimate; ONLY="name name" runs just the named parts):
#   f32          float32, no mask: curve step (200 steps) + 20-point sweep over 6,000 images
#   reference    the authors' release on the same workload (reference_peer.py: 100 steps, 4 t)
#   f32_k01      float32, mask k = k_r = 0.1: curve step only (paper: ~75% faster epochs)
#   e2e          float32, end-to-end MCU phase of the CIFAR-10 protocol (D_r 45,000,
#                D_f 5,000, test 10,000, 10 epochs, paper mask k=0.5, k_r=0.1, 20 t)
#   bf16         bfloat16, no mask: curve step + sweep
#   bf16_k01     bfloat16, mask k = k_r = 0.1: curve step only
#   f32_paper    float32, paper mask k=0.5, k_r=0.1: curve step only
#   strategies   the sweep under map, vmap and vmap in chunks of 5 (checks resolve_strategy)
#   profile      20 steps + a 4-t sweep under jax.profiler, tarred to $OUT/profile.tgz
#
# Before the call (on the development machine, in the repository root):
#   1. Put the authors' release (TIML-Group/Mode-Connectivity-Unlearning, commit ff1f215: its
#      curves.py, unlearn.py, utils.py and models/) in the git-ignored folder
#      reference_release/, and copy the timing script beside it:
#        cp ../shared/bench/reference_peer.py reference_release/
#      (../shared does not travel to the device machine; PEER=path overrides the script's
#      location.) The script writes reference_release/config/baseline_results.yml when absent.
#      Never commit the release: /reference_release/ is in .gitignore.
#   2. The release needs torch, scipy, pyyaml, tqdm and timm, and mcu-jax needs jax with CUDA,
#      flax, optax, orbax-checkpoint, chex, scipy, scikit-learn: the device image's python3
#      has all of them (jax 0.11 with the CUDA 13 plugin, torch 2.11). Elsewhere, install them
#      first (pip install -e '.[cuda12]' torch timm scipy pyyaml tqdm); if jax sees no GPU the
#      script installs wheels carried in .whl/ or, where a network exists, jax[cuda12].
#
# The call (device tool): command "bash experiments/gpu_check.sh", carry ["reference_release"],
# timeout_s 600. Results land in $OUT (default runs/gpu_check): summary.md (every benchmark's
# table, and the ratios to the release), results.json (all benchmark JSON), reference.json,
# log.txt, nvidia-smi.txt and profile.tgz. Check this file with: bash -n experiments/gpu_check.sh
# Dry run of the flow on CPU (tiny sizes, minutes):
#   REQUIRE_GPU=0 PY=.venv/bin/python OUT=/tmp/gc ONLY="f32 f32_k01 e2e" EXTRA_ARGS="--model \
#   cnn_small --train-images 1437 --steps 20 --num-t 4 --sweep-images 256 --retain 1293 \
#   --forget 144 --test 360 --epochs 1" bash experiments/gpu_check.sh
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT=${OUT:-$REPO/runs/gpu_check}
BUDGET_S=${BUDGET_S:-540}
PY=${PY:-python3}
RELEASE=${RELEASE:-reference_release}
ONLY=${ONLY:-}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.md
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$LOG"
: >"$SUMMARY"

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
  else
    log "jax sees no GPU: trying pip install jax[cuda12]"
    $PY -m pip install -q "jax[cuda12]>=0.10,<0.13" >>"$LOG" 2>&1
  fi
  if ! gpu_backend; then
    log "no GPU backend for jax; stopping (see log.txt)"
    exit 1
  fi
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' 2>&1 | tee -a "$LOG"

# 2. parts
bench() {  # name, estimated seconds, benchmark arguments...
  local name=$1 need=$2 left rc
  shift 2
  wanted "$name" || return 0
  left=$(time_left "$name" "$need") || return 0
  log "run $name: experiments/benchmark.py $*"
  # shellcheck disable=SC2086 # EXTRA_ARGS is a list of words
  timeout "$left" $PY experiments/benchmark.py "$@" ${EXTRA_ARGS:-} --json "$WORK/$name.json" \
    >"$WORK/$name.txt" 2>>"$LOG"
  rc=$?
  { echo "## $name"; echo; cat "$WORK/$name.txt"; echo; } >>"$SUMMARY"
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
  left=$(time_left reference 120) || return 0
  mkdir -p "$RELEASE/config"
  [ -f "$RELEASE/config/baseline_results.yml" ] ||
    echo "cifar10: {random: {train: 100.0, val: 90.0}}" >"$RELEASE/config/baseline_results.yml"
  log "run reference: $peer $RELEASE steps=100 nt=4"
  timeout "$left" $PY "$peer" "$RELEASE" steps=100 nt=4 >"$OUT/reference.json" 2>>"$LOG"
  log "done reference (exit $?): $(cat "$OUT/reference.json")"
}

STD=(--model preresnet110 --batch-size 128 --steps 200 --warmup 10)
bench f32 150 "${STD[@]}" --dtype float32 --mask none --num-t 20 --sweep-images 6000
reference
bench f32_k01 90 "${STD[@]}" --dtype float32 --mask 0.1 --skip-sweep
bench e2e 200 --model preresnet110 --dtype float32 --mask paper --skip-step --skip-sweep \
  --end-to-end --retain 45000 --forget 5000 --test 10000 --epochs 10 --num-t 20
bench bf16 150 "${STD[@]}" --dtype bfloat16 --mask none --num-t 20 --sweep-images 6000
bench bf16_k01 90 "${STD[@]}" --dtype bfloat16 --mask 0.1 --skip-sweep
bench f32_paper 90 "${STD[@]}" --dtype float32 --mask paper --skip-sweep
bench strategies 200 --model preresnet110 --dtype float32 --skip-step --num-t 20 \
  --sweep-images 6000 --compare-strategies --chunk-size 5
if wanted profile && time_left profile 90 >/dev/null; then
  bench profile 90 --model preresnet110 --steps 20 --warmup 5 --num-t 4 --sweep-images 1000 \
    --profile "$WORK/profile"
  tar -C "$WORK" -czf "$OUT/profile.tgz" profile 2>>"$LOG" || log "no profile written"
  if [ -f "$OUT/profile.tgz" ] && [ "$(stat -c %s "$OUT/profile.tgz")" -gt 16000000 ]; then
    log "profile.tgz is over 16 MB and would not come back; removed"
    rm -f "$OUT/profile.tgz"
  fi
fi

# 3. one JSON file and the ratios to the release
$PY - "$WORK" "$OUT" <<'EOF' 2>>"$LOG" | tee -a "$SUMMARY"
import glob, json, os, sys
work, out = sys.argv[1:]
runs = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(f"{work}/*.json"))}
json.dump(runs, open(f"{out}/results.json", "w"), indent=1, default=str)
try:
    ref = json.loads(open(f"{out}/reference.json").read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    ref = None
print("## ratios to the authors' release (same machine, same call)\n")
if ref is None or "f32" not in runs:
    print("not available (reference or f32 run missing)")
    sys.exit()
rows = {r["part"]: r["numbers"] for r in runs["f32"]["rows"]}
print(f"- reference: {ref['step_ms']} ms/step, {ref['sweep_img_fwd_per_s']} img-fwd/s "
      f"({ref['device']}, torch {ref['torch']})")
if "curve step" in rows:
    ms = rows["curve step"]["step_ms"]
    print(f"- curve step: mcu-jax {ms:.2f} ms vs {ref['step_ms']} ms: {ref['step_ms'] / ms:.1f}x")
if "sweep" in rows:
    f = rows["sweep"]["image_forwards_per_s"]
    print(f"- sweep: mcu-jax {f:,.0f} vs {ref['sweep_img_fwd_per_s']:,.0f} img-fwd/s: "
          f"{f / ref['sweep_img_fwd_per_s']:.1f}x")
EOF
rm -rf "$WORK"
log "finished in ${SECONDS}s; results in $OUT"
