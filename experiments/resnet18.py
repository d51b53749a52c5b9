"""The original's model and budget: ResNet18 (width 64, 11,173,962 parameters), 20 epochs, batch 512.

Meant for a GPU or TPU; the recipe choices and their measured ablations are in docs/recipes.md. Run from the
project root:

    python -m cifar_jax.train --config experiments/resnet18.py --workdir runs/resnet18
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.optim.lr = 0.2  # Peak of the one-cycle schedule for batch 512 (0.1 is the base default for smaller batches).
    config.model.dtype = "bfloat16"  # Convolutions in bfloat16 (parameters, BatchNorm statistics, logits float32): 2x float32's step on an H200.
    config.eval_flip = True  # Test-time views: the image and its mirror...
    config.eval_translate = 2  # ...and both shifted 2 pixels (airbench's views); the last epoch also logs the single view.
    config.checkpoint.every_epochs = 5  # A GPU epoch is ~1 s and the per-epoch saves (130 MB) doubled it; the end and signals still save.
    return config
