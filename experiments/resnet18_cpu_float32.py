"""The CPU recipe for CPUs without native bfloat16 (no AVX512-BF16 or AMX: most desktops and laptops).

Starts from ``resnet18_cpu.py`` and sets only what differs. There oneDNN runs bfloat16 at 1.42x float32; here it
has no bfloat16 kernels, ``model.conv=auto`` would send bfloat16 to XLA's kernels (several times slower), so
this computes in float32 on oneDNN and buys the lost speed back with a narrower net. Measured on an Intel
Xeon (Ice Lake, AVX-512 + VNNI, no BF16), 2 cores: README and docs/results/resnet18_cpu_float32. Run from the
project root (needs ``pip install -e ".[onednn]"``):

    python -m cifar_jax.train --config experiments/resnet18_cpu_float32.py --workdir runs/resnet18_cpu_float32
"""

from pathlib import Path

from cifar_jax.config import load_config


def get_config():
    config = load_config(Path(__file__).with_name("resnet18_cpu.py"))
    config.model.dtype = "float32"  # oneDNN's float32 kernels: the fast path without native bfloat16.
    # Width 16 (701,466 parameters): 454 images/s at batch 128 on the Xeon, width 24 only 198 (2.3x the time for
    # 2.25x the FLOPs), so 45 min buy ~17 epochs of width 16 or ~8 of width 24 (train_throughput.py --width W).
    config.model.width = 16
    # ~112 s an epoch on the Xeon plus 5 evaluations of ~35 s: ~42 min. A shared VM: one attempt ran at 150 s an
    # epoch (14% of the CPU time stolen), which would be ~53 min; 16 epochs took 33.6 min (86.82%).
    config.epochs = 20
    # Twice the steps of batch 256 at about the same images/s (separate runs at width 16: 454 and 441 at 128, 376
    # and 496 at 256; docs/benchmarks.md); lr scaled with the batch.
    config.batch_size = 128
    config.optim.lr = 0.1
    config.eval_translate = 1  # airbench's 1-px shifted views: +0.24 points on the width-24 model, +0.47 on width 16.
    config.eval_every = 4  # Evaluation with 6 views an image costs ~40% of an epoch: every 4th epoch (and the last).
    return config
