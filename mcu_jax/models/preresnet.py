"""Pre-activation ResNet with bottleneck blocks for CIFAR (He et al., 2016b), as in NOTES.md.

PreResNet-110 (the MCU paper's CIFAR model, following Garipov et al.'s curve code):

- stem: conv3x3 3->16, no bias;
- three stages of 12 pre-activation bottleneck blocks, planes 16/32/64, expansion 4
  (outputs 64/128/256), strides 1/2/2;
- block: BN-ReLU-conv1x1(planes), BN-ReLU-conv3x3(planes, stride), BN-ReLU-conv1x1(4 planes),
  all convs without bias, added to the shortcut with no activation after the sum;
- the first block of each stage (where the shape changes) has a strided 1x1 conv shortcut
  without BN, applied to the block's raw input x (not the pre-activated one), as in Garipov
  et al. and the standard PreResNet; the other blocks use the identity;
- head: BN-ReLU-global average pool-linear (with bias).

1,146,842 parameters with 10 classes and 1,169,972 with 100 (BN scale and bias count,
running statistics do not). Depth is 9n+2 (n blocks per stage); ``preresnet(depth)`` builds
any of them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mcu_jax.models.layers import batch_norm, conv, conv_bn, dense, resolve_dtype

EXPANSION = 4


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1 (x4), plus identity or 1x1 projection."""

    planes: int
    stride: int
    project: bool
    dtype: Any
    bn_momentum: float
    fold: bool = False  # evaluation mode: bn2, bn3 folded into conv1, conv2 (layers.conv_bn)
    fused: bool = False  # BatchNorm + ReLU with the hand-written backward pass (batchnorm.py)

    @nn.compact
    def __call__(self, x, train: bool):
        dt = self.dtype
        bn_relu = functools.partial(batch_norm, train, self.bn_momentum, dtype=dt, relu=True,
                                    fused=self.fused)
        out = bn_relu(name="bn1")(x)
        out = conv_bn(conv(self.planes, 1, dtype=dt, name="conv1"), bn_relu(name="bn2"), out,
                      self.fold)
        out = conv_bn(conv(self.planes, 3, self.stride, dtype=dt, name="conv2"),
                      bn_relu(name="bn3"), out, self.fold)
        out = conv(self.planes * EXPANSION, 1, dtype=dt, name="conv3")(out)
        if self.project:
            x = conv(self.planes * EXPANSION, 1, self.stride, dtype=dt, name="shortcut")(x)
        return out + x


class PreResNet(nn.Module):
    """PreResNet-(9n+2) with bottleneck blocks; ``depth=110`` is the MCU CIFAR model."""

    num_classes: int
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    depth: int = 110
    # Evaluation mode only: the BatchNorms that directly follow a convolution (two of three
    # per block) are folded into it (layers.conv_bn); same variables, same function.
    fold_bn: bool = False
    fused_bn: bool = False  # train mode: BN + ReLU with a hand-written backward (batchnorm.py)

    @nn.compact
    def __call__(self, x, train: bool):
        if (self.depth - 2) % 9 != 0 or self.depth < 11:
            raise ValueError(f"depth: got {self.depth}, expected 9n+2 with n >= 1 (11, 110, ...)")
        n = (self.depth - 2) // 9
        dt = resolve_dtype(self.dtype)
        fold = self.fold_bn and not train and not self.is_initializing()
        x = x.astype(dt)
        x = conv(16, 3, dtype=dt, name="stem")(x)
        for s, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2), strict=True)):
            for b in range(n):
                first = b == 0
                project = first and (stride != 1 or x.shape[-1] != planes * EXPANSION)
                x = PreActBottleneck(
                    planes,
                    stride if first else 1,
                    project,
                    dt,
                    self.bn_momentum,
                    fold,
                    self.fused_bn,
                    name=f"stage{s + 1}_block{b}",
                )(x, train)
        x = batch_norm(train, self.bn_momentum, dtype=dt, relu=True, fused=self.fused_bn,
                       name="final_bn")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = dense(self.num_classes, dtype=dt, name="head")(x)
        return x.astype(jnp.float32)


def preresnet(depth: int, num_classes: int, **options: Any) -> PreResNet:
    """PreResNet of the given ``depth`` (9n+2: 11, 20, ..., 110, 164); options as ``create``."""
    if (depth - 2) % 9 != 0 or depth < 11:
        raise ValueError(f"depth: got {depth}, expected 9n+2 with n >= 1 (11, 110, ...)")
    return PreResNet(num_classes=num_classes, depth=depth, **options)
