"""A run of seconds for tests and a first look: width 4, 512 train and 256 test images, 2 epochs.

    python -m cifar_jax.train --config experiments/smoke.py --workdir runs/smoke
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.model.width = 4
    config.epochs = 2
    config.batch_size = 64
    config.eval_batch_size = 128
    config.data.max_train = 512
    config.data.max_test = 256
    config.optim.lr = 0.05
    config.optim.schedule = "onecycle"
    config.augment.cutout = 8
    return config
