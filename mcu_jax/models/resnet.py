"""CIFAR ResNet (He et al., 2016, section 4.2): ResNet-20 and the generic 6n+2 family.

Stem conv3x3 16-BN-ReLU, three stages of n basic blocks with 16/32/64 channels and strides
1/2/2, global average pool, linear head. A basic block is conv3x3-BN-ReLU-conv3x3-BN, added
to the shortcut, then ReLU.

Shortcut: **option A** by default, as in the paper's CIFAR experiments: where the shape
changes, the identity is subsampled with stride 2 and zero-padded in channels (no
parameters); this gives 269,722 parameters for ResNet-20 with 10 classes ("0.27M" in the
paper). ``shortcut="B"`` uses a strided 1x1 conv + BN projection instead (272,474).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mcu_jax.models.layers import batch_norm, conv, conv_bn, dense, resolve_dtype


class BasicBlock(nn.Module):
    """Post-activation basic block with an option-A or option-B shortcut."""

    planes: int
    stride: int
    shortcut: str
    dtype: Any
    bn_momentum: float
    fold: bool = False  # evaluation mode: every BN folded into its conv (layers.conv_bn)
    fused: bool = False  # BatchNorm (+ ReLU) with the hand-written backward pass (batchnorm.py)

    @nn.compact
    def __call__(self, x, train: bool):
        dt, m, fold, fused = self.dtype, self.bn_momentum, self.fold, self.fused
        out = conv_bn(conv(self.planes, 3, self.stride, dtype=dt, name="conv1"),
                      batch_norm(train, m, dtype=dt, relu=True, fused=fused, name="bn1"), x, fold)
        out = conv_bn(conv(self.planes, 3, dtype=dt, name="conv2"),
                      batch_norm(train, m, dtype=dt, fused=fused, name="bn2"), out, fold)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            if self.shortcut == "A":
                residual = x[:, :: self.stride, :: self.stride, :]
                extra = self.planes - x.shape[-1]
                residual = jnp.pad(
                    residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2))
                )
            else:
                residual = conv_bn(conv(self.planes, 1, self.stride, dtype=dt, name="proj"),
                                   batch_norm(train, m, dtype=dt, fused=fused, name="proj_bn"),
                                   x, fold)
        return nn.relu(out + residual)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``depth=20`` is ResNet-20."""

    casts_kernels: ClassVar[bool] = True  # every layer casts its kernel to dtype

    num_classes: int
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    depth: int = 20
    shortcut: str = "A"
    widths: tuple[int, int, int] = (16, 32, 64)
    # Evaluation mode only: every BatchNorm is folded into the convolution before it
    # (layers.conv_bn); same variables, same function.
    fold_bn: bool = False
    fused_bn: bool = False  # train mode: BN (+ ReLU) with a hand-written backward (batchnorm.py)

    @nn.compact
    def __call__(self, x, train: bool):
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(f"depth: got {self.depth}, expected 6n+2 with n >= 1 (20, 32, ...)")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"shortcut: got {self.shortcut!r}, expected 'A' or 'B'")
        n = (self.depth - 2) // 6
        dt = resolve_dtype(self.dtype)
        fold = self.fold_bn and not train and not self.is_initializing()
        x = x.astype(dt)
        x = conv_bn(conv(self.widths[0], 3, dtype=dt, name="stem"),
                    batch_norm(train, self.bn_momentum, dtype=dt, relu=True,
                               fused=self.fused_bn, name="stem_bn"), x, fold)
        for s, (planes, stride) in enumerate(zip(self.widths, (1, 2, 2), strict=True)):
            for b in range(n):
                x = BasicBlock(
                    planes,
                    stride if b == 0 else 1,
                    self.shortcut,
                    dt,
                    self.bn_momentum,
                    fold,
                    self.fused_bn,
                    name=f"stage{s + 1}_block{b}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = dense(self.num_classes, dtype=dt, name="head")(x)
        return x.astype(jnp.float32)
