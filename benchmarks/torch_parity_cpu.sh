#!/usr/bin/env bash
# cifar_jax (model.init=pytorch, the default) against the PyTorch reference trainer (benchmarks/torch_reference.py)
# on the same data, order and recipe, 3 seeds each, on a CPU in float32: docs/recipes.md, "cifar_jax against PyTorch".
# The recipe is experiments/resnet18.py's (one-cycle Nesterov SGD lr 0.2, wd 5e-4, crop + flip + cutout 8, label
# smoothing 0.1) at CPU size: width 16, 6 epochs of batch 256 on a class-balanced 20,000-image subset.
#   bash benchmarks/torch_parity_cpu.sh            # ~25 min on 2 cores; OUT=runs/torch_parity_cpu SEEDS="0 1 2"
set -euo pipefail
OUT=${OUT:-runs/torch_parity_cpu}; SEEDS=${SEEDS:-"0 1 2"}; EPOCHS=${EPOCHS:-6}; MAX_TRAIN=${MAX_TRAIN:-20000}
mkdir -p "$OUT"
COMMON=(model.width=16 model.dtype=float32 "epochs=$EPOCHS" batch_size=256 "data.max_train=$MAX_TRAIN" eval_translate=0)
sets=(); for s in "${COMMON[@]}"; do sets+=(--set "$s"); done
# shellcheck disable=SC2086
python -m cifar_jax.sweep --config experiments/resnet18.py --workdir "$OUT/cifar_jax" --parallel 1 --seeds $SEEDS \
  --variant pytorch_init=model.init=pytorch "${sets[@]}" --set "eval_every=$EPOCHS" --set log.report=false \
  --set log.progress_bar=false | tee "$OUT/cifar_jax.log"
# shellcheck disable=SC2086
python benchmarks/torch_reference.py --config experiments/resnet18.py --seeds $SEEDS --threads 2 \
  --set "${COMMON[@]}" | tee "$OUT/torch.log"
