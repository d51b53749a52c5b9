"""The CIFAR ResNet18 of cifar_jax.models.resnet, written in PyTorch (for reference timings and Grad-CAM checks).

Module names mirror the Flax parameter tree (``stem_conv``, ``layer1.block0.conv1``,
``shortcut_conv``, ``head``) so ``load_flax_variables`` can copy weights by path.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)  # Torch momentum 0.1 == Flax momentum 0.9; eps 1e-5 in both.
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.shortcut_conv = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
        return torch.relu(y + s)


class ResNet18(nn.Module):
    """3x3 stride-1 stem (no max-pool), BasicBlocks 2-2-2-2 of w, 2w, 4w, 8w channels, avg-pool, linear head."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        cin = width
        for k in range(4):
            cout = width * 2**k
            blocks = [BasicBlock(cin, cout, 1 if k == 0 else 2), BasicBlock(cout, cout, 1)]
            self.add_module(f"layer{k + 1}", nn.Sequential(OrderedDict(block0=blocks[0], block1=blocks[1])))
            cin = cout
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem_conv(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x.mean(dim=(2, 3)))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_flax_variables(model: ResNet18, variables: dict, dtype=np.float32) -> None:
    """Copies Flax ``{"params", "batch_stats"}`` into ``model`` as ``dtype``: HWIO -> OIHW kernels, dense kernel transposed."""
    from flax.traverse_util import flatten_dict

    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in flatten_dict(variables[collection]).items():
            module, leaf = ".".join(path[:-1]), path[-1]
            value = np.asarray(value, dtype)
            if leaf == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
            state[f"{module}.{name}"] = torch.from_numpy(np.array(value, order="C"))  # A writable copy.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
