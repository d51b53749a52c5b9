"""A narrow ResNet18 (width 16) that 2 CPU cores train on the JPEG CIFAR-10 copy in about 40 minutes.

Same architecture as the original with a quarter of the channels (16-32-64-128), trained with oneDNN
convolutions (model.conv=auto picks them once ``pip install -e ".[onednn]"`` is done; without them
XLA's kernels take ~2.5x as long). Measured figures: README and docs/results/resnet18_cpu. Run from
the project root:

    python -m cifar_jax.train --config experiments/resnet18_cpu.py --workdir runs/resnet18_cpu
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.model.width = 16  # A quarter of the channels: ~16x fewer FLOPs, 701,466 parameters.
    config.epochs = 28  # What fits in 45 min on 2 cores: ~86 s an epoch with oneDNN convs (AVX-512 EPYC).
    config.batch_size = 256  # Smaller batches: more steps in few epochs, and fits the CPU caches better.
    config.optim.lr = 0.2
    config.optim.warmup_fraction = 0.2  # A shorter run peaks sooner.
    config.optim.label_smoothing = 0.1  # +~0.5% test accuracy in short runs.
    # No cutout: 12 epochs with cutout 8 underfit (train 84.2% < test 84.9%); a width-16 net has little to spare.
    config.augment.cutout = 0
    config.eval_flip = True  # Test-time flip averaging: free accuracy at evaluation.
    # One JAX device: the oneDNN kernels use both cores themselves (2 devices would shard the step, where
    # model.conv=auto falls back to XLA: 2.5x slower).
    config.cpu_devices = 0
    return config
