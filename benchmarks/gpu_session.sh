#!/usr/bin/env bash
# One time-boxed GPU session (one H100/H200), what 2026-12-04's session left to measure (docs/recipes.md):
#   1. python -m cifar_jax.sweep: the three best variants of experiments/sweeps/recipe.py (seed 0 of all eight was
#      measured on 2026-12-04) with seeds 1 and 2, six processes side by side: 3-seed means of the candidates
#   2. where the cold start goes: experiments/resnet18.py for one epoch, no report, each time with empty compile
#      caches: as it is, then with one compile-time change each (XLA autotuning level 1, Triton GEMMs off, the
#      evaluation batch equal to the training batch); each prints its Time: line
# Run from the project root with what benchmarks/gpu_env.sh names beside the project,
# then `bash benchmarks/gpu_session.sh` (device tool: carry .carry, timeout 580 s). SMOKE=1 dry-runs every step on
# a CPU at smoke size. Results go to $OUT: summary.txt, env.txt, runs.tar.gz (sweep table, the runs' metrics and
# logs, no checkpoints), logs.tar.gz.
source "$(dirname "$0")/gpu_env.sh"
(nvidia-smi dmon -s um -o T -d 1 > $L/dmon.txt 2>&1 &) ; 

if [ "$SMOKE" = 1 ]; then
  CONFIG=experiments/smoke.py; SWEEP_EXTRA="--seeds 1 --parallel 3 --set epochs=1 --set data.max_train=256"; PROBE="--config.data.max_train=256"
else
  CONFIG=experiments/resnet18.py; SWEEP_EXTRA="--seeds 1 2 --memory-fraction 0.14"; PROBE=""
fi

# 1. The sweep. Preallocation off: each process takes what it uses, up to its fraction.
log "sweep: start"
CIFAR_JAX_CACHE=/tmp/cache_sweep XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $(cap 290) \
  $PY -m cifar_jax.sweep --config $CONFIG --variants experiments/sweeps/recipe.py --workdir /tmp/runs/sweep \
  --only cut8_ls0.1 cut8_ls0.1_lr0.4 cut0_ls0.1 --set data.path="$DATA" --set eval_every=10 --timeout $(cap 265) \
  $SWEEP_EXTRA > $L/sweep.log 2>&1
log "sweep: rc=$?"; tail -6 $L/sweep.log | tee -a "$OUT/summary.txt"

# 2. Cold-start probes: one epoch, no report, empty compile cache each (the data cache is shared: decoded once).
probe() {  # NAME XLA_FLAGS EXTRA...: one cold run, its Time: line into the summary
  local name=$1 flags=$2; shift 2
  [ $(cap 100) -lt 45 ] && { log "probe $name: skipped"; return; }
  rm -rf /tmp/cache_probe && mkdir -p /tmp/cache_probe && cp /tmp/cache_sweep/*.npz /tmp/cache_probe/ 2>/dev/null
  s=$(date +%s)
  XLA_FLAGS="$flags" CIFAR_JAX_CACHE=/tmp/cache_probe timeout $(cap 100) $PY -m cifar_jax.train --config $CONFIG \
    --workdir /tmp/runs/probe_$name --config.data.path="$DATA" --config.epochs=1 --config.log.report=false \
    --config.log.progress_bar=false $PROBE "$@" > $L/probe_$name.log 2>&1
  log "probe $name: rc=$? wall=$(( $(date +%s) - s ))s"
  grep -E "^(Compiled|Time:|epoch 1:)" $L/probe_$name.log | cut -c1-160 | tee -a "$OUT/summary.txt"
}
probe default ""
probe autotune1 "--xla_gpu_autotune_level=1"
probe eval512 "" --config.eval_batch_size=512
probe no_triton_gemm "--xla_gpu_enable_triton_gemm=false"

pkill -f "nvidia-smi dmon" 2>/dev/null
(cd /tmp/runs && tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=.lock . 2>/dev/null)
(cd $L && tar -czf "$OUT/logs.tar.gz" . 2>/dev/null)
log "done"
