# Sourced by the GPU session scripts (benchmarks/gpu_*.sh): paths, the time budget and its helpers, the wheels the
# GPU machine lacks, env.txt. Expects to run from the project root with beside the project (no internet there):
#   .carry/cifar10-jpg.tar.gz          a copy of ../shared/data/cifar10-jpg.tar.gz
#   .carry/whl/ml_collections-*.whl    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                                        --implementation cp --platform manylinux2014_x86_64 -d .carry/whl ml-collections==1.1.0
# Results go to $OUT (summary.txt, env.txt, what the script adds); logs to $L.
set -u
ROOT=$(pwd); OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"; L=/tmp/gpu_logs; rm -rf $L /tmp/runs; mkdir -p $L /tmp/runs
T0=$(date +%s); BUDGET=${BUDGET:-560}; SMOKE=${SMOKE:-0}
el() { echo $(( $(date +%s) - T0 )); }
cap() { local a=$(( BUDGET - $(el) )); echo $(( a < $1 ? a : $1 )); }  # seconds a step may take: at most $1, within the budget
log() { echo "[$(el)s] $*" | tee -a "$OUT/summary.txt"; }
DATA=${DATA:-$ROOT/.carry/cifar10-jpg.tar.gz}
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$ROOT"
PY=${PY:-python3}

if ls .carry/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; git -C "$ROOT" rev-parse HEAD; } > "$OUT/env.txt" 2>&1
$PY -c "import importlib.metadata as m, jax; print({p: m.version(p) for p in ('jax','jaxlib','flax','optax','orbax-checkpoint')}, jax.devices())" >> "$OUT/env.txt" 2>&1 || log "imports failed (env.txt)"
