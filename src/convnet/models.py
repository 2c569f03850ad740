"""Ready-made networks and their training recipes.

* :func:`lenet`: the LeNet-style network ``convnet train`` trains on digits by default;
* :func:`resnet`: the CIFAR-10 ResNets of He et al., "Deep Residual Learning for Image
  Recognition" (CVPR 2016), section 4.2 (ResNet-8, -14, -20, -32, ...);
* :func:`mobilenet`: a small depthwise-separable network (MobileNet blocks, Howard et al.
  2017) for 32x32 images.

Each network comes with the recipe ``convnet train`` uses for it (:data:`RECIPES`), so a
benchmark or a script can train it the same way without importing the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _args
from .layers import (
    AdaptiveAvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    RngLike,
    _as_rng,
)
from .model import Sequential

__all__ = ["lenet", "resnet", "mobilenet", "Recipe", "RECIPES", "MODELS", "build"]


@dataclass(frozen=True)
class Recipe:
    """How ``convnet train`` trains a network by default.

    ``optimizer`` is ``"adam"`` or ``"sgd"`` (SGD with ``momentum``); the learning rate
    ``lr[optimizer]`` decays with a cosine schedule over ``epochs``; ``weight_decay`` is L2
    on the parameters only (never on batch norm's running estimates, which are buffers).
    """

    epochs: int
    batch_size: int
    optimizer: str
    lr: dict
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


# LeNet on the bundled digits: 10 epochs of Adam at batch 64, see benchmarks/train_mnist.py for
# the measured time and accuracy. Test accuracy over seeds 0-3 (1 BLAS thread): 98.1, 98.5,
# 98.2, 98.6% (test loss 0.054 on average), where the former 15 epochs at batch 32 and lr 1e-3
# gave 98.3, 98.4, 98.2, 98.2% (0.058) in twice the time. SGD at lr 0.05: 98.5, 98.2% (seeds 0,
# 1) against 98.4, 98.3% before; lr 0.1 did worse (98.0, 97.9%).
LENET_RECIPE = Recipe(epochs=10, batch_size=64, optimizer="adam", lr={"adam": 4e-3, "sgd": 0.05})
# He et al. 4.2: SGD, momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 (their 164 epochs with
# steps at 82 and 123 are replaced by a shorter cosine decay; CPU time is dear).
RESNET_RECIPE = Recipe(epochs=30, batch_size=128, optimizer="sgd", lr={"sgd": 0.1, "adam": 1e-3},
                       momentum=0.9, weight_decay=1e-4)


def lenet(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), *, rng: RngLike = 0,
          channels: tuple[int, int] = (16, 32), hidden: int = 128, dropout: float = 0.25,
          dtype: Any = np.float32) -> Sequential:
    """The LeNet-style network ``convnet train`` uses.

    conv 5x5 pad 2 -> ReLU -> maxpool 2 -> conv 5x5 -> ReLU -> maxpool 2 -> flatten ->
    dropout -> linear -> ReLU -> linear (logits).

    Parameters
    ----------
    num_classes : int
    input_shape : (C, H, W) of one sample; H and W at least 12.
    rng : Generator, int seed or None; initial weights and the dropout masks.
    channels : output channels of the two conv layers.
    hidden : width of the hidden linear layer.
    dropout : dropout probability on the flattened features (0 for none).
    dtype : float32 (default) or float64.
    """
    gen = _as_rng(rng)
    shape = _input_shape(input_shape)
    c, h, w = shape
    features = [
        Conv2d(c, channels[0], 5, padding=2, rng=gen, dtype=dtype), ReLU(), MaxPool2d(2),
        Conv2d(channels[0], channels[1], 5, rng=gen, dtype=dtype), ReLU(), MaxPool2d(2), Flatten(),
    ]
    # The flattened size follows from the layers themselves: run one zero image through.
    try:
        flat = Sequential(*features).predict(np.zeros((1, c, h, w), dtype=dtype)).shape[1]
    except ValueError:
        raise ValueError(f"input_shape {tuple(input_shape)} is too small for lenet (need H, W >= 12)") from None
    drop = [Dropout(dropout, rng=int(gen.integers(2**63)))] if dropout else []
    head = [*drop, Linear(flat, hidden, rng=gen, dtype=dtype), ReLU(),
            Linear(hidden, num_classes, rng=gen, dtype=dtype)]
    return Sequential(*features, *head, input_shape=(c, h, w))


def _input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = Sequential._check_input_shape(input_shape)
    if shape is None or len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _he_conv(c_in: int, c_out: int, k: int, stride: int, gen: np.random.Generator, dtype: Any) -> Conv2d:
    """A bias-free conv (batch norm follows) with He et al.'s initialization N(0, 2 / fan_in)."""
    conv = Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False, rng=gen, dtype=dtype)
    std = math.sqrt(2.0 / (c_in * k * k))
    conv.set_param("weight", gen.normal(0.0, std, conv.weight.shape))
    return conv


def basic_block(c_in: int, c_out: int, stride: int, gen: np.random.Generator, dtype: Any) -> Residual:
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (ReLU follows the sum).

    Where the shape changes (stride 2, more channels) the shortcut is a projection,
    a strided 1x1 conv and BN (He et al.'s option B); elsewhere it is the identity.
    """
    body = Sequential(_he_conv(c_in, c_out, 3, stride, gen, dtype), BatchNorm2d(c_out, dtype=dtype), ReLU(),
                      _he_conv(c_out, c_out, 3, 1, gen, dtype), BatchNorm2d(c_out, dtype=dtype))
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = Sequential(_he_conv(c_in, c_out, 1, stride, gen, dtype), BatchNorm2d(c_out, dtype=dtype))
    return Residual(body, shortcut)


def resnet(depth: int = 20, num_classes: int = 10, width: int = 16, *, input_shape: Sequence[int] = (3, 32, 32),
           rng: RngLike = 0, dtype: Any = np.float32) -> Sequential:
    """The CIFAR-10 ResNet of He et al. 2016 (section 4.2) with ``depth = 6n + 2`` layers.

    A 3x3 conv with ``width`` filters (BN, ReLU), then three stages of ``n`` basic blocks
    (two 3x3 convs each) with ``width``, ``2*width`` and ``4*width`` filters (16/32/64 by
    default) on 32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 has stride 2),
    global average pooling and a ``num_classes``-way linear layer: ResNet-8 (n=1), -14,
    -20 (n=3, 0.27M parameters), -32, ...

    Shortcuts are identities except where a stage changes shape; there they are projections
    (a strided 1x1 conv with BN: the paper's option B; its CIFAR nets used option A,
    zero-padded identities, which costs ~1% fewer parameters and no weights). Conv weights
    are drawn N(0, 2/fan_in) (He et al. 2015), BN starts at weight 1, bias 0.

    Parameters
    ----------
    depth : int, 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)
    num_classes : int
    width : filters of the first stage
    input_shape : (C, H, W) of one sample; default CIFAR's (3, 32, 32)
    rng : Generator, int seed or None
    dtype : float32 (default) or float64

    Returns
    -------
    Sequential: ``stem conv, BN, ReLU, Residual + ReLU (x 3n), AdaptiveAvgPool2d(1),
    Flatten, Linear``; parameters named as PyTorch would (``"3.body.0.weight"``).
    """
    depth = _args.positive_int(depth, "depth")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    num_classes = _args.positive_int(num_classes, "num_classes")
    width = _args.positive_int(width, "width")
    c, h, w = _input_shape(input_shape)
    gen = _as_rng(rng)
    n = (depth - 2) // 6
    layers: list = [_he_conv(c, width, 3, 1, gen, dtype), BatchNorm2d(width, dtype=dtype), ReLU()]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers += [basic_block(c_in, c_out, stride, gen, dtype), ReLU()]
            c_in = c_out
    layers += [AdaptiveAvgPool2d(1), Flatten(), Linear(c_in, num_classes, rng=gen, dtype=dtype)]
    return Sequential(*layers, input_shape=(c, h, w))


def separable_block(c_in: int, c_out: int, stride: int, gen: np.random.Generator, dtype: Any) -> list:
    """MobileNet's block: a 3x3 depthwise conv (``groups=c_in``: one filter per channel), BN,
    ReLU, then a 1x1 pointwise conv that mixes the channels, BN, ReLU."""
    depthwise = Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False, rng=gen, dtype=dtype)
    depthwise.set_param("weight", gen.normal(0.0, math.sqrt(2.0 / 9), depthwise.weight.shape))
    return [depthwise, BatchNorm2d(c_in, dtype=dtype), ReLU(),
            _he_conv(c_in, c_out, 1, 1, gen, dtype), BatchNorm2d(c_out, dtype=dtype), ReLU()]


#: (output channels as a multiple of ``width``, stride) of each separable block of :func:`mobilenet`.
MOBILENET_BLOCKS = ((2, 1), (4, 2), (4, 1), (8, 2), (8, 1), (16, 2))


def mobilenet(num_classes: int = 10, width: int = 16, *, input_shape: Sequence[int] = (3, 32, 32),
              rng: RngLike = 0, dtype: Any = np.float32) -> Sequential:
    """A small depthwise-separable network for 32x32 images, after MobileNet v1 (Howard et al.
    2017): a 3x3 conv with ``width`` filters (BN, ReLU), six separable blocks
    (:func:`separable_block`) widening to 2, 4, 4, 8, 8, 16 x ``width`` channels with stride 2
    at the 2nd, 4th and 6th (32x32 -> 4x4), global average pooling and a linear layer.
    With ``width=16``: 73K parameters (ResNet-20: 272K).

    Returns
    -------
    Sequential of plain layers (no nesting): depthwise convs are ``Conv2d(c, c, 3, groups=c)``.
    """
    num_classes = _args.positive_int(num_classes, "num_classes")
    width = _args.positive_int(width, "width")
    c, h, w = _input_shape(input_shape)
    gen = _as_rng(rng)
    layers: list = [_he_conv(c, width, 3, 1, gen, dtype), BatchNorm2d(width, dtype=dtype), ReLU()]
    c_in = width
    for mult, stride in MOBILENET_BLOCKS:
        layers += separable_block(c_in, mult * width, stride, gen, dtype)
        c_in = mult * width
    layers += [AdaptiveAvgPool2d(1), Flatten(), Linear(c_in, num_classes, rng=gen, dtype=dtype)]
    return Sequential(*layers, input_shape=(c, h, w))


#: Networks by the name ``convnet train --model`` takes: ``name -> (builder, recipe)``;
#: each builder takes ``num_classes``, ``input_shape``, ``rng``.
MODELS: dict[str, tuple[Callable[..., Sequential], Recipe]] = {
    "lenet": (lenet, LENET_RECIPE),
    "resnet8": (lambda **kw: resnet(8, **kw), RESNET_RECIPE),
    "resnet14": (lambda **kw: resnet(14, **kw), RESNET_RECIPE),
    "resnet20": (lambda **kw: resnet(20, **kw), RESNET_RECIPE),
    "mobilenet": (mobilenet, RESNET_RECIPE),
}
RECIPES = {name: recipe for name, (_, recipe) in MODELS.items()}


def build(name: str, num_classes: int, input_shape: Sequence[int], rng: RngLike = 0) -> Sequential:
    """The network ``name`` (a key of :data:`MODELS`) for ``num_classes`` and ``input_shape``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    return MODELS[name][0](num_classes=num_classes, input_shape=input_shape, rng=rng)
