#!/usr/bin/env bash
# One time-boxed GPU session (one H100/H200): the recipe sweep, the chosen recipe cold and warm, the train step.
#   1. python -m cifar_jax.sweep: experiments/sweeps/recipe.py's 8 variants x seeds 0 1, 8 processes side by side
#      (seed 0 of every variant first, so a sweep cut short by its time box still ranks every variant once)
#   2. the variant with the best mean single-view accuracy, trained by the README's command (seed 2) with empty
#      caches (cold: data decode + compile), then again into a new workdir with the caches filled (warm)
#   3. benchmarks/gpu_train.py in bfloat16 (JAX device loop vs PyTorch eager, same card)
# Run from the project root with these beside the project (the GPU machine has no internet):
#   .carry/cifar10-jpg.tar.gz          a copy of ../shared/data/cifar10-jpg.tar.gz
#   .carry/whl/ml_collections-*.whl    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                                        --implementation cp --platform manylinux2014_x86_64 -d .carry/whl ml-collections==1.1.0
# then `bash benchmarks/gpu_session.sh` (device tool: carry .carry, timeout 580 s). SMOKE=1 dry-runs every step on
# a CPU at smoke size. Results go to $OUT: summary.txt, env.txt, runs.tar.gz (sweep table, both runs' reports and
# logs, no checkpoints), logs.tar.gz.
set -u
ROOT=$(pwd); OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"; L=/tmp/gpu_logs; rm -rf $L /tmp/runs; mkdir -p $L /tmp/runs
T0=$(date +%s); BUDGET=${BUDGET:-560}; SMOKE=${SMOKE:-0}
el() { echo $(( $(date +%s) - T0 )); }
cap() { local a=$(( BUDGET - $(el) )); echo $(( a < $1 ? a : $1 )); }
log() { echo "[$(el)s] $*" | tee -a "$OUT/summary.txt"; }
DATA=${DATA:-$ROOT/.carry/cifar10-jpg.tar.gz}
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$ROOT"
PY=${PY:-python3}

if ls .carry/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > "$OUT/env.txt" 2>&1
$PY -c "import importlib.metadata as m, jax; print({p: m.version(p) for p in ('jax','jaxlib','flax','optax','orbax-checkpoint','torch')}, jax.devices())" >> "$OUT/env.txt" 2>&1 || log "imports failed (env.txt)"
(nvidia-smi dmon -s um -o T -d 1 > $L/dmon.txt 2>&1 &) ; 

if [ "$SMOKE" = 1 ]; then
  CONFIG=experiments/smoke.py; SWEEP_EXTRA="--seeds 0 --parallel 4 --set epochs=1 --set data.max_train=256"
else
  CONFIG=experiments/resnet18.py; SWEEP_EXTRA="--seeds 0 1 --parallel 8 --memory-fraction 0.11"
fi

# 1. The sweep. Preallocation off: each process takes what it uses, up to its fraction.
log "sweep: start"
CIFAR_JAX_CACHE=/tmp/cache_sweep XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $(cap 350) \
  $PY -m cifar_jax.sweep --config $CONFIG --variants experiments/sweeps/recipe.py --workdir /tmp/runs/sweep \
  --set data.path="$DATA" --set eval_every=10 --timeout $(cap 335) $SWEEP_EXTRA > $L/sweep.log 2>&1
log "sweep: rc=$?"; tail -12 $L/sweep.log | tee -a "$OUT/summary.txt"

# 2. The best variant by mean single-view accuracy, run as a user would: cold, then warm.
WIN=$($PY - <<'EOF'
import json
try:
    rows = [r for r in json.load(open("/tmp/runs/sweep/sweep.json")) if r["single_mean"] is not None]
    best = max(rows, key=lambda r: (r["single_mean"], r["mean"]))
    print(" ".join(f"--config.{o}" for o in best["overrides"]))
except Exception as e:
    print("")
EOF
)
log "chosen: ${WIN:-(config as is)}"
for kind in cold warm; do
  s=$(date +%s)
  [ $kind = cold ] && box=120 || box=70
  CIFAR_JAX_CACHE=/tmp/cache_recipe timeout $(cap $box) $PY -m cifar_jax.train --config $CONFIG --workdir /tmp/runs/$kind \
    --config.data.path="$DATA" --config.seed=2 --config.log.progress_bar=false $WIN > $L/$kind.log 2>&1
  log "$kind: rc=$? wall=$(( $(date +%s) - s ))s"
  grep -E "^(Compiled|Time:|epoch (1|2|20):)" $L/$kind.log | tee -a "$OUT/summary.txt"
done

# 3. The train step, bfloat16, against PyTorch eager (bf16 autocast) on the same card.
if [ "$SMOKE" = 1 ]; then BENCH="--quick --skip-torch"; else BENCH="--skip-compile"; fi
if [ $(cap 120) -ge 60 ] || [ "$SMOKE" = 1 ]; then  # Only with time for it: the runs above come first.
  timeout $(cap 120) $PY benchmarks/gpu_train.py --dtype bfloat16 $BENCH --out $L/gpu_train_bf16.json > $L/bench_bf16.log 2>&1
  log "gpu_train bfloat16: rc=$?"; tail -6 $L/bench_bf16.log | tee -a "$OUT/summary.txt"
else
  log "gpu_train bfloat16: skipped ($(cap 120)s left)"
fi

pkill -f "nvidia-smi dmon" 2>/dev/null
(cd /tmp/runs && tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=.lock . 2>/dev/null)
(cd $L && tar -czf "$OUT/logs.tar.gz" . 2>/dev/null)
log "done"
