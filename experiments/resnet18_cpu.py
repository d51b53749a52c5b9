"""A narrow ResNet18 that 2 CPU cores train on the JPEG CIFAR-10 copy in about 42 minutes, on any CPU.

Same architecture as the original with fewer channels, oneDNN convolutions (``pip install -e ".[onednn]"``;
model.conv=auto picks them) and ``model.dtype="auto"``, resolved at startup in one printed line:

- bfloat16 (float32 parameters) on a CPU with AVX512-BF16 or AMX: width 24 (24-48-96-192), 21 epochs of batch 256.
  Measured on an AMD EPYC with AVX-512 + AVX512-BF16, 2 cores: docs/results/resnet18_cpu.
- float32 elsewhere (no native bfloat16: oneDNN has no bfloat16 kernels there and XLA's are several times slower),
  with the narrower, shorter recipe of ``auto_float32`` below: width 16, 20 epochs of batch 128, test-time shifts.
  Measured on an Intel Xeon (Ice Lake, AVX-512 + VNNI, no BF16), 2 cores: docs/results/resnet18_cpu_float32.

Run from the project root:

    python -m cifar_jax.train --config experiments/resnet18_cpu.py --workdir runs/resnet18_cpu

``--config.model.dtype=float32`` (or bfloat16) forces one recipe on any CPU.
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    # 3/8 of the channels: ~7x fewer FLOPs, 1,575,202 parameters. Measured in the same 45 min: width 24 for
    # 21 epochs 89.17%, width 16 for 40 epochs 88.93% (28 epochs: 88.58%: it had flattened).
    config.model.width = 24
    # bfloat16 compute where the CPU runs it natively: 1.42x the images/s of float32 at width 16 on the EPYC
    # (benchmarks/train_throughput.py --dtype float32,bfloat16); float32 elsewhere (cifar_jax.onednn.fast_dtype).
    config.model.dtype = "auto"
    config.epochs = 21  # What fits in 45 min on 2 cores: ~115 s an epoch (AVX-512 + AVX512-BF16 EPYC).
    config.batch_size = 256  # Smaller batches: more steps in few epochs, and fits the CPU caches better.
    config.optim.lr = 0.2
    config.optim.warmup_fraction = 0.2  # A shorter run peaks sooner.
    config.optim.label_smoothing = 0.1  # +~0.5% test accuracy in short runs.
    # No cutout: 12 epochs of width 16 with cutout 8 underfit (train 84.2% < test 84.9%).
    config.augment.cutout = 0
    config.eval_flip = True  # Test-time flip averaging: free accuracy at evaluation.
    # One JAX device: the oneDNN kernels use both cores themselves (2 devices would shard the step, where
    # model.conv=auto falls back to XLA's kernels: several times slower).
    config.cpu_devices = 0

    # Without native bfloat16, oneDNN's float32 kernels are the fast path; a narrower net buys the lost speed back.
    config.auto_float32 = {
        # Width 16 (701,466 parameters): 454 images/s at batch 128 on the Xeon, width 24 only 198 (2.3x the time for
        # 2.25x the FLOPs), so 45 min buy ~17 epochs of width 16 or ~8 of width 24 (train_throughput.py --width W).
        "model": {"width": 16},
        # ~112 s an epoch on the Xeon plus 5 evaluations of ~35 s: ~42 min. A shared VM: one attempt ran at 150 s an
        # epoch (14% of the CPU time stolen), which would be ~53 min; 16 epochs took 33.6 min (86.82%).
        "epochs": 20,
        # Twice the steps of batch 256 at about the same images/s (separate runs at width 16: 454 and 441 at 128, 376
        # and 496 at 256; docs/benchmarks.md); lr scaled with the batch.
        "batch_size": 128,
        "optim": {"lr": 0.1},
        # airbench's 1-px shifted views: +0.24 points on the width-24 model, +0.47 on width 16.
        "eval_translate": 1,
        # Evaluation with 6 views an image costs ~40% of an epoch: every 4th epoch (and the last).
        "eval_every": 4,
    }
    return config
