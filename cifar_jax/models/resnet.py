"""CIFAR ResNets (BasicBlock / Bottleneck) as Flax linen modules.

The network is the CIFAR variant used by the original PyTorch project: a 3x3
stride-1 stem with no max-pool, four stages of ``width, 2*width, 4*width,
8*width`` channels, global average pooling and a dense head. With ``width=64``
and ten classes ResNet18 has exactly 11,173,962 parameters.

Every stage can be used as a split point (see ``STAGES``)::

    acts   = model.apply(variables, x, end="layer4")      # (N, 4, 4, 8w)
    logits = model.apply(variables, acts, start="layer4")  # (N, classes)

and the two composed are the full model. Grad-CAM differentiates the second
half with respect to ``acts``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifar_jax.models.batchnorm import BatchNorm

# model.norm_backward -> the BatchNorm module: Flax's (autodiff gradient) or the closed-form-gradient one.
NORMS = {"autodiff": nn.BatchNorm, "closed_form": BatchNorm}

# Split points, in order. "stem" is the output of conv-bn-relu at the input,
# "layerK" the output of stage K, "pool" the globally pooled feature vector.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
# The stage outputs a CAM explains, input to output (any module path works too: cifar_jax.cam.list_layers).
CAM_LAYERS = STAGES[1:5]
# Top-level parameter groups, output to input: the cascading randomisation's order ("stem" covers stem_conv
# and stem_bn, "layerK" every block of stage K, "head" the dense layer).
PARAM_GROUPS = ("head", *reversed(STAGES[:5]))

# PyTorch pads a stride-2 3x3 conv by one pixel on every side; XLA's "SAME"
# would pad (0, 1) instead and give a different function for the same weights.
PAD_3x3 = ((1, 1), (1, 1))



def _uniform_fan_in_bias(fan_in: int):
    """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Init:
    """How a ResNet's layers start: the convolutions' kernels, the head's kernel, and its bias (from its fan-in).

    BatchNorm starts at scale 1, bias 0 (mean 0, var 1) under every scheme, as in PyTorch and Flax.
    """

    conv: Callable
    head: Callable
    head_bias: Callable[[int], Callable]  # fan_in -> bias initialiser


# model.init -> Init. "pytorch": PyTorch's default for every Conv2d and Linear, which the original keeps:
# kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)) (variance 1/(3 fan_in)), and the Linear bias U(+-1/sqrt(fan_in)).
# "he": torchvision's ResNet init, He-normal (variance 2/fan_out) convolutions, with Flax's default head
# (LeCun-normal kernel, zero bias); 2.45x the std of "pytorch" for a 3x3 conv of equal in/out channels.
INITS = {
    "pytorch": Init(
        conv=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        head=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        head_bias=_uniform_fan_in_bias,
    ),
    "he": Init(
        conv=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        head=nn.initializers.lecun_normal(),
        head_bias=lambda fan_in: nn.initializers.zeros,
    ),
}


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1-conv projection) shortcut."""

    channels: int
    strides: int = 1
    conv: Callable[..., nn.Module] = nn.Conv
    norm: Callable[..., nn.Module] = nn.BatchNorm
    zero_init_residual: bool = False
    act: Callable = nn.relu
    expansion = 1

    @nn.compact
    def __call__(self, x):
        out_channels = self.channels * self.expansion
        y = self.conv(self.channels, (3, 3), self.strides, padding=PAD_3x3, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.channels, (3, 3), 1, padding=PAD_3x3, name="conv2")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name="bn2", scale_init=scale_init)(y)
        return self.act(y + _shortcut(self, x, out_channels))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; shortcut as in BasicBlock."""

    channels: int
    strides: int = 1
    conv: Callable[..., nn.Module] = nn.Conv
    norm: Callable[..., nn.Module] = nn.BatchNorm
    zero_init_residual: bool = False
    act: Callable = nn.relu
    expansion = 4

    @nn.compact
    def __call__(self, x):
        out_channels = self.channels * self.expansion
        y = self.conv(self.channels, (1, 1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.channels, (3, 3), self.strides, padding=PAD_3x3, name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(out_channels, (1, 1), name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name="bn3", scale_init=scale_init)(y)
        return self.act(y + _shortcut(self, x, out_channels))


def _shortcut(block, x, out_channels):
    """Identity, or a strided 1x1 conv + BN when the shape changes."""
    if block.strides == 1 and x.shape[-1] == out_channels:
        return x
    y = block.conv(out_channels, (1, 1), block.strides, padding="VALID", name="shortcut_conv")(x)
    return block.norm(name="shortcut_bn")(y)


class Stage(nn.Module):
    """A sequence of residual blocks; the first one may downsample."""

    block: Any
    channels: int
    num_blocks: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    zero_init_residual: bool = False
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = self.block(
                self.channels,
                self.strides if i == 0 else 1,
                conv=self.conv,
                norm=self.norm,
                zero_init_residual=self.zero_init_residual,
                act=self.act,
                name=f"block{i}",
            )(x)
        return x


class ResNet(nn.Module):
    """CIFAR ResNet.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet18.
      block: BasicBlock or Bottleneck.
      num_classes: size of the dense head.
      width: channels of the stem and the first stage (64 in the original).
      dtype: computation dtype (params stay float32), e.g. jnp.bfloat16.
      norm_dtype: BatchNorm's computation and output dtype; None = ``dtype``. float32 around bfloat16
        convolutions is faster on XLA:CPU, whose BatchNorm on bfloat16 tensors is slow (docs/benchmarks.md).
      norm_backward: "autodiff" (``nn.BatchNorm``) or "closed_form" (``batchnorm.BatchNorm``: the same
        variables and forward, a hand-written training gradient; equal within float tolerance).
      zero_init_residual: start each block's last BN scale at zero.
      weight_init: a key of ``INITS`` (``model.init``): "pytorch" (the original's, PyTorch's default) or "he"
        (torchvision's).
      act: the nonlinearity (guided backpropagation swaps in a guided ReLU).
      conv_general_dilated: the convolution every ``nn.Conv`` calls (None: ``lax.conv_general_dilated``),
        e.g. ``cifar_jax.onednn.conv_general_dilated`` on CPU; the parameters are the same either way.
    """

    stage_sizes: Sequence[int]
    block: Any = BasicBlock
    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    norm_dtype: Any = None
    norm_backward: str = "autodiff"
    zero_init_residual: bool = False
    weight_init: str = "pytorch"
    act: Callable = nn.relu
    conv_general_dilated: Callable | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, start: str | None = None, end: str | None = None):
        """Runs the network from just after ``start`` up to and including ``end``.

        Args:
          x: (N, 32, 32, 3) normalised images if ``start`` is None, else the
            output of stage ``start`` (e.g. (N, 4, 4, 8*width) for "layer4").
          train: use batch statistics and update ``batch_stats`` (mutable).
          start: a name in STAGES whose output ``x`` is, or None for images.
          end: a name in STAGES whose output to return, or None for logits.

        Returns:
          (N, num_classes) logits, or the activations of stage ``end``.
        """
        first = 0 if start is None else _stage_index(start) + 1
        last = len(STAGES) if end is None else _stage_index(end)
        if first > last:
            raise ValueError(f"start={start!r} comes after end={end!r}")
        if self.weight_init not in INITS:
            raise ValueError(f"unknown weight_init {self.weight_init!r}; choose one of {', '.join(INITS)}")
        init = INITS[self.weight_init]
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=init.conv, conv_general_dilated=self.conv_general_dilated
        )
        norm = functools.partial(
            NORMS[self.norm_backward], use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=self.dtype if self.norm_dtype is None else self.norm_dtype,
        )
        x = jnp.asarray(x, self.dtype)
        for index in range(first, last + 1):
            name = STAGES[index] if index < len(STAGES) else "head"
            if name == "stem":
                x = conv(self.width, (3, 3), padding=PAD_3x3, name="stem_conv")(x)
                x = self.act(norm(name="stem_bn")(x))
            elif name.startswith("layer"):
                k = index - STAGES.index("layer1")  # 0..3: the stage's position among the four
                x = Stage(
                    self.block,
                    self.width * 2**k,
                    self.stage_sizes[k],
                    1 if k == 0 else 2,
                    conv,
                    norm,
                    self.zero_init_residual,
                    self.act,
                    name=name,
                )(x)
            elif name == "pool":
                x = jnp.mean(x, axis=(1, 2))
            else:  # head: logits are always float32 for a stable softmax.
                x = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=init.head,
                             bias_init=init.head_bias(x.shape[-1]), name="head")(x)
        return x


def _stage_index(name: str) -> int:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES.index(name)


ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock)  # Small and quick to compile: tests.
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
