"""The GPU recipe on CIFAR-100 (official binary release, 100 fine classes), for a GPU or TPU.

experiments/resnet18.py (its model, batch, bfloat16 compute and test-time views) plus what CIFAR-100 needs. The
archive (cifar-100-binary.tar.gz, 161 MB) is downloaded once into the cache dir
and checked against its published sha256. Not run on this repository's CPUs: the
longer schedule below is reasoned, not tuned. Run from the project root:

    python -m cifar_jax.train --config experiments/resnet18_cifar100.py --workdir runs/resnet18_cifar100
"""

from pathlib import Path

from cifar_jax.config import load_config


def get_config():
    config = load_config(Path(__file__).with_name("resnet18.py"))
    config.data.source = "cifar100"  # The official CIFAR-100 binary release instead of the CIFAR-10 JPEG folder.
    config.data.label_mode = "fine"  # 100 classes (the usual benchmark); "coarse" gives the 20 superclasses.
    config.epochs = 30  # 100 classes of 500 images each learn more slowly than 10 of 5,000.
    return config
