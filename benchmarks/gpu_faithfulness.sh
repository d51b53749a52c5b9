#!/usr/bin/env bash
# One time-boxed GPU session (one H100/H200) for docs/faithfulness.md:
#   1. two trainings side by side, no report: experiments/resnet18.py (the full-width model) and
#      experiments/resnet18_cpu.py (the CPU config's model, trained here to save 45 CPU minutes)
#   2. python -m cifar_jax.explain --evaluate on the full-width model, 1000 test images: first with the
#      evaluation's programs not yet in the compilation cache (cold), then again (warm); each timed
#   3. where the cold time goes: benchmarks/faithfulness_profile.py (first call and later calls per metric)
#   4. the sanity-check variants and the deletion fills on the full-width model
#   5. the CPU config's workdir (its last checkpoint) to $OUT, to be evaluated on a CPU
# Run from the project root with what benchmarks/gpu_env.sh names beside it: `bash benchmarks/gpu_faithfulness.sh`
# (device tool: carry .carry, timeout 580 s). SMOKE=1 dry-runs it on a CPU at smoke size. Results in $OUT:
# summary.txt, env.txt, runs.tar.gz (metrics, logs, explain/ outputs; no checkpoints), logs.tar.gz, cpu_run.tar.gz.
# ONLY=evaluate: steps 1 and 2 for the full-width model alone (the evaluation's cold and warm times), then the outputs.
source "$(dirname "$0")/gpu_env.sh"
export CIFAR_JAX_CACHE=/tmp/cache
if [ "$SMOKE" = 1 ]; then
  SMALL="--config.epochs=1 --config.data.max_train=512 --config.data.max_test=200"; FULL=experiments/smoke.py; CPU=experiments/smoke.py
  IMAGES="--eval-images 40"; N=40
else
  SMALL=""; FULL=experiments/resnet18.py; CPU=experiments/resnet18_cpu.py; IMAGES=""; N=100
fi
W=/tmp/runs/resnet18; WC=/tmp/runs/resnet18_cpu
train() {  # CONFIG WORKDIR: one training in the background, half the GPU memory
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout $(cap 240) $PY -m cifar_jax.train --config $1 --workdir $2 \
    --config.data.path="$DATA" --config.log.report=false --config.log.progress_bar=false $SMALL > $L/train_$(basename $2).log 2>&1
}
timed() {  # NAME LIMIT COMMAND...: one step with its wall time and exit status in the summary
  local name=$1 limit=$2; shift 2; local s=$(date +%s)
  timeout $(cap $limit) "$@" > $L/$name.log 2>&1
  log "$name: rc=$? wall=$(( $(date +%s) - s ))s"
}

ONLY=${ONLY:-}
log "training: start"
if [ "$ONLY" = evaluate ]; then train $FULL $W; else train $FULL $W & train $CPU $WC & wait; fi
for w in $W $WC; do grep -E "^(model.dtype|epoch [0-9]+:|Time:)" $L/train_$(basename $w).log | tail -3 | cut -c1-200 | tee -a "$OUT/summary.txt"; done

timed evaluate_cold 200 $PY -m cifar_jax.explain --workdir $W --evaluate $IMAGES
cp $W/explain/faithfulness.md $L/faithfulness_cold.md 2>/dev/null
timed evaluate_warm 120 $PY -m cifar_jax.explain --workdir $W --evaluate $IMAGES
tail -32 $L/evaluate_warm.log | head -12 >> "$OUT/summary.txt"
outputs() {  # runs.tar.gz (no checkpoints) and logs.tar.gz to $OUT
  (cd /tmp/runs && tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=.lock . 2>/dev/null)
  (cd $L && tar -czf "$OUT/logs.tar.gz" . 2>/dev/null)
  log "done"
}
if [ "$ONLY" = evaluate ]; then outputs; exit 0; fi
timed profile 80 $PY benchmarks/faithfulness_profile.py $W
cat $L/profile.log | grep -v WARN | tail -6 >> "$OUT/summary.txt"
timed sanity_variants 90 $PY benchmarks/sanity_variants.py --workdir $W --images $N --draws 8
timed deletion_baselines 60 $PY benchmarks/deletion_baselines.py --workdir $W --images $(( 2 * N ))

last=$(ls $WC/checkpoints 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
(cd /tmp/runs && tar -czf "$OUT/cpu_run.tar.gz" --exclude=.lock --exclude=explain \
  $(cd /tmp/runs && ls -d resnet18_cpu/* | grep -v checkpoints) resnet18_cpu/checkpoints/$last 2>/dev/null)
outputs
