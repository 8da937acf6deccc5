"""VGG-16 with BatchNorm for 64x64 inputs (Tiny-ImageNet), as specified in NOTES.md.

Features: 13 conv3x3(+bias)-BN-ReLU layers in blocks [64, 64] [128, 128] [256 x3] [512 x3]
[512 x3], each block followed by a 2x2 max-pool (64x64 -> 2x2x512 = 2048 features, flattened
in NHWC order). Classifier: dropout(0.5)-2048->512-ReLU-dropout(0.5)-512->512-ReLU-512->classes.

This is the correct 13-convolution VGG-16-BN. The MCU authors' release mis-builds it with only
8 convolutions; we follow the architecture the paper names instead, so parameter counts and
accuracies are not directly comparable with that release. 16,137,480 parameters for 200
classes (14,714,688 conv weights and biases, the standard VGG-16 feature extractor, + 8,448 BN
+ 1,414,344 classifier).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mcu_jax.models.layers import batch_norm, conv, conv_bn, dense, resolve_dtype

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16BN(nn.Module):
    """VGG-16-BN; dropout in the classifier uses the "dropout" rng in train mode."""

    casts_kernels: ClassVar[bool] = True  # every layer casts its kernel to dtype

    num_classes: int
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    dropout_rate: float = 0.5
    hidden: int = 512
    # Evaluation mode only: every BatchNorm is folded into the convolution before it
    # (layers.conv_bn); same variables, same function.
    fold_bn: bool = False
    fused_bn: bool = False  # train mode: BN + ReLU with a hand-written backward (batchnorm.py)

    @nn.compact
    def __call__(self, x, train: bool):
        dt = resolve_dtype(self.dtype)
        fold = self.fold_bn and not train and not self.is_initializing()
        x = x.astype(dt)
        layer = 0
        for block in VGG16_BLOCKS:
            for width in block:
                x = conv_bn(conv(width, 3, dtype=dt, use_bias=True, name=f"conv{layer}"),
                            batch_norm(train, self.bn_momentum, dtype=dt, relu=True,
                                       fused=self.fused_bn, name=f"bn{layer}"), x, fold)
                layer += 1
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(self.hidden, dtype=dt, name="fc1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(self.hidden, dtype=dt, name="fc2")(x))
        x = dense(self.num_classes, dtype=dt, name="head")(x)
        return x.astype(jnp.float32)
