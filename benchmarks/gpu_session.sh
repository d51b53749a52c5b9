#!/usr/bin/env bash
# One time-boxed GPU session (one H100/H200): is the accuracy gap the data or us? (issue "the original, reproduced")
#   1. PyTorch reference (benchmarks/torch_reference.py, bfloat16 autocast, channels_last), started first so it uses
#      the GPU while the JAX processes compile: the original recipe and cut8_ls0.1, PyTorch's init, seeds 0 1 2
#   2. python -m cifar_jax.sweep: original, original_he, cut8_ls0.1, cut8_ls0.1_he of experiments/sweeps/recipe.py,
#      seeds 0 1 2, twelve processes side by side: 3-seed means of each recipe under each initialisation
#   3. if time is left, the cold start of experiments/resnet18.py for one epoch with empty compile caches (Time: line)
# Run from the project root with what benchmarks/gpu_env.sh names beside the project,
# then `bash benchmarks/gpu_session.sh` (device tool: carry .carry, timeout 580 s). SMOKE=1 dry-runs every step on
# a CPU at smoke size. Results go to $OUT: summary.txt, env.txt, runs.tar.gz (sweep table, the runs' metrics and
# logs, no checkpoints), logs.tar.gz.
source "$(dirname "$0")/gpu_env.sh"
(nvidia-smi dmon -s um -o T -d 1 > $L/dmon.txt 2>&1 &) ;

if [ "$SMOKE" = 1 ]; then
  CONFIG=experiments/smoke.py; SEEDS="0 1"; SWEEP_EXTRA="--parallel 2 --set epochs=1 --set data.max_train=256"
  TORCH_EXTRA="epochs=1 data.max_train=512 model.width=4"  # 8 steps: OneCycleLR fails below 2 warm-up steps; PROBE="--config.data.max_train=256"
else
  CONFIG=experiments/resnet18.py; SEEDS="0 1 2"; SWEEP_EXTRA="--parallel 12 --memory-fraction 0.07"; TORCH_EXTRA=""
  PROBE=""
fi
recipe() { $PY -c "import sys; sys.path.insert(0, 'experiments/sweeps'); import recipe; print(' '.join(recipe.get_variants()['$1']))"; }

# 1. The PyTorch reference, in the background: one process per recipe, its seeds one after another.
for name in original cut8_ls0.1; do
  # shellcheck disable=SC2046
  timeout $(cap 420) $PY benchmarks/torch_reference.py --config $CONFIG --seeds $SEEDS \
    --set data.path="$DATA" $(recipe $name) $TORCH_EXTRA > $L/torch_$name.log 2>&1 &
done

# 2. The sweep. Preallocation off: each process takes what it uses, up to its fraction.
log "sweep: start"
CIFAR_JAX_CACHE=/tmp/cache_sweep XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $(cap 440) \
  $PY -m cifar_jax.sweep --config $CONFIG --variants experiments/sweeps/recipe.py --workdir /tmp/runs/sweep \
  --only original original_he cut8_ls0.1 cut8_ls0.1_he --seeds $SEEDS --set data.path="$DATA" --set eval_every=10 \
  --timeout $(cap 420) $SWEEP_EXTRA > $L/sweep.log 2>&1
log "sweep: rc=$?"; tail -8 $L/sweep.log | tee -a "$OUT/summary.txt"
wait
for name in original cut8_ls0.1; do log "torch $name:"; grep -E "^(seed|\{)" $L/torch_$name.log | tee -a "$OUT/summary.txt"; done

# 3. Cold-start probe: one epoch, no report, empty compile cache (the data cache is shared: decoded once).
if [ $(cap 100) -ge 60 ]; then
  rm -rf /tmp/cache_probe && mkdir -p /tmp/cache_probe && cp /tmp/cache_sweep/*.npz /tmp/cache_probe/ 2>/dev/null
  s=$(date +%s)
  CIFAR_JAX_CACHE=/tmp/cache_probe timeout $(cap 100) $PY -m cifar_jax.train --config $CONFIG \
    --workdir /tmp/runs/probe --config.data.path="$DATA" --config.epochs=1 --config.log.report=false \
    --config.log.progress_bar=false $PROBE > $L/probe.log 2>&1
  log "probe: rc=$? wall=$(( $(date +%s) - s ))s"
  grep -E "^(Compiled|Time:|epoch 1:)" $L/probe.log | cut -c1-160 | tee -a "$OUT/summary.txt"
else
  log "probe: skipped"
fi

pkill -f "nvidia-smi dmon" 2>/dev/null
(cd /tmp/runs && tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=.lock . 2>/dev/null)
(cd $L && tar -czf "$OUT/logs.tar.gz" . 2>/dev/null)
log "done"
