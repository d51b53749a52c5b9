"""A narrow ResNet18 (width 16) that 2 CPU cores train on the JPEG CIFAR-10 copy in under an hour.

Same architecture as the original with a quarter of the channels (16-32-64-128),
batch 256, one-cycle Nesterov SGD, crop + flip, label smoothing, and test-time
flip averaging. Run from the project root:

    python -m cifar_jax.train --config experiments/resnet18_cpu.py --workdir runs/resnet18_cpu
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.model.name = "resnet18"
    config.model.width = 16
    config.epochs = 12
    config.batch_size = 256
    config.optim.name = "sgd"
    config.optim.lr = 0.2
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "onecycle"
    config.optim.warmup_fraction = 0.2
    config.optim.label_smoothing = 0.1
    config.augment.cutout = 8  # A short run regularises less: a smaller hole than the 20-epoch recipe.
    config.eval_flip = True
    return config
