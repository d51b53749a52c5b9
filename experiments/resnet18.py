"""The original recipe: ResNet18 (width 64, 11,173,962 parameters), 20 epochs, batch 512.

One-cycle SGD with Nesterov momentum, crop + flip + cutout. Meant for a GPU or
TPU (about 40 minutes an epoch on 2 CPU cores). Run from the project root:

    python -m cifar_jax.train --config experiments/resnet18.py --workdir runs/resnet18
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.model.name = "resnet18"
    config.model.width = 64
    config.epochs = 20
    config.batch_size = 512
    config.optim.name = "sgd"
    config.optim.lr = 0.2
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "onecycle"
    config.optim.warmup_fraction = 0.25
    config.augment.crop_padding = 4
    config.augment.flip = True
    config.augment.cutout = 16
    return config
