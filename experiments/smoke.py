"""A run of seconds for tests and a first look: width 4, 512 train and 256 test images, 2 epochs.

    python -m cifar_jax.train --config experiments/smoke.py --workdir runs/smoke
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.model.width = 4  # Tiny: compiles and trains in seconds on a CPU.
    config.epochs = 2
    config.batch_size = 64  # 8 steps an epoch over the 512 images.
    config.eval_batch_size = 100  # Three test batches, the last one padded: exercises the padding mask.
    config.data.max_train = 512  # A class-balanced subset.
    config.data.max_test = 256
    config.optim.lr = 0.05  # Stable for so few steps.
    config.augment.cutout = 8  # Scaled to the run; still exercises cutout.
    config.eval_flip = True  # Exercises the flip-averaged predictor everywhere (report, explain, faithfulness).
    return config
