"""Model registry: ``get_model(name, **kwargs)`` returns a Flax module."""

from __future__ import annotations

from cifar_jax.models.resnet import STAGES, BasicBlock, Bottleneck, ResNet, ResNet10, ResNet18, ResNet34, ResNet50

MODELS = {"resnet10": ResNet10, "resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50}


def get_model(name: str, **kwargs) -> ResNet:
    """Builds a registered model by (case-insensitive) name, e.g. ``get_model("resnet18", width=16)``."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)


__all__ = ["MODELS", "STAGES", "BasicBlock", "Bottleneck", "ResNet", "ResNet10", "ResNet18", "ResNet34", "ResNet50", "get_model"]
