"""A narrow ResNet18 (width 24) that 2 CPU cores train on the JPEG CIFAR-10 copy in about 42 minutes.

Same architecture as the original with 3/8 of the channels (24-48-96-192), computed in bfloat16
(float32 parameters) with oneDNN convolutions: model.conv=auto picks them once
``pip install -e ".[onednn]"`` is done and the CPU has AVX512-BF16 or AMX. Elsewhere the same recipe runs
on XLA's kernels, several times slower: on a CPU without native bfloat16, set model.dtype=float32
(oneDNN float32 is ~1.4x slower than bfloat16 here, XLA's float32 kernels ~3.4x) and fewer epochs.
Measured figures: README and docs/results/resnet18_cpu. Run from the project root:

    python -m cifar_jax.train --config experiments/resnet18_cpu.py --workdir runs/resnet18_cpu
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    # 3/8 of the channels: ~7x fewer FLOPs, 1,575,202 parameters. Measured in the same 45 min: width 24 for
    # 21 epochs 89.17%, width 16 for 40 epochs 88.93% (28 epochs: 88.58%: it had flattened).
    config.model.width = 24
    # bfloat16 compute: 1.42x the images/s of float32 at width 16 on this CPU (benchmarks/train_throughput.py
    # --dtype float32,bfloat16).
    config.model.dtype = "bfloat16"
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
    return config
