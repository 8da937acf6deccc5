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
import re
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcu_jax import checks
from mcu_jax.models import chain
from mcu_jax.models import conv3x3 as c3
from mcu_jax.models import pointwise as pw
from mcu_jax.models.batchnorm import (
    BatchNormApplied,
    BatchNormCoefficients,
    statistics_sums,
)
from mcu_jax.models.layers import (
    BN_EPSILON,
    batch_norm,
    conv,
    conv_bn,
    conv_folded,
    conv_init,
    dense,
    fold_affine,
    resolve_dtype,
)

EXPANSION = 4

#: Values of the models' ``pointwise`` field: "conv" (``nn.Conv`` and ``nn.BatchNorm``, the
#: default), "fused" (the 1x1 convolutions as ``pointwise.bn_relu_matmul``: its Pallas kernel
#: where the program is compiled for an NVIDIA GPU, the same computation in XLA ops
#: elsewhere) and "interpret" (the kernel interpreted by Pallas on any backend: tests).
POINTWISE = ("conv", "fused", "interpret")


def pointwise_impl(pointwise: str, name: str = "pointwise") -> str:
    """The kernel impl (``kernel_impl``) that a ``pointwise`` (or ``conv3x3``, named by
    ``name``) setting other than "conv" runs (checked: ValueError for a value not in
    :data:`POINTWISE`)."""
    checks.choice(name, pointwise, POINTWISE)
    return "auto" if pointwise == "fused" else pointwise


def check_conv3x3(pointwise: str, conv3x3: str) -> None:
    """ValueError unless ``conv3x3`` and ``pointwise`` are settings of :data:`POINTWISE` and
    the 3x3 kernel, where on, has the 1x1 kernel's output to read (``pointwise`` not
    "conv")."""
    if pointwise_impl(conv3x3, "conv3x3") != "conv" and pointwise_impl(pointwise) == "conv":
        raise ValueError(f"conv3x3={conv3x3!r} needs pointwise 'fused' or 'interpret' (the "
                         "3x3 kernel reads the 1x1 kernel's output), got pointwise='conv'")


class _ConvKernel(nn.Module):
    """The variables of a bias-free ``nn.Conv`` (``kernel``, (size, size, K, N), the same
    initial values), returned for a kernel of this package: a 1x1 one as the (K, N) matrix,
    a 3x3 one as it is (HWIO)."""

    features: int
    size: int = 1

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", conv_init, (self.size, self.size, in_features,
                                                   self.features), jnp.float32)
        return kernel.reshape(in_features, self.features) if self.size == 1 else kernel


class Pending(NamedTuple):
    """A block's output not yet computed (evaluation with BatchNorm folded and the kernels):
    conv3's activated input ``a``, its (K, N) filter ``w`` and the shortcut's output. The
    next block computes it in its conv1's kernel (``chain.matmul_chain``), the model's head
    with conv3's kernel alone (:func:`resolved`)."""

    a: jax.Array
    w: jax.Array
    residual: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.a.shape[:-1], self.w.shape[-1])


def resolved(x, impl: str):
    """``x``, or a :class:`Pending` block output computed by conv3's kernel."""
    if not isinstance(x, Pending):
        return x
    return pw.bn_relu_matmul(x.a, *pw.identity(x.a.shape[-1]), x.w, x.residual, impl=impl)[0]


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1 (x4), plus identity or 1x1 projection."""

    planes: int
    stride: int
    project: bool
    dtype: Any
    bn_momentum: float
    # evaluation mode: bn2, bn3 folded into conv1, conv2 (layers.conv_bn; with pointwise, bn2
    # on the kernel's way out)
    fold: bool = False
    fused: bool = False  # BatchNorm + ReLU with the hand-written backward pass (batchnorm.py)
    pointwise: str = "conv"  # POINTWISE; not "conv": returns (out, its sums or None)
    # POINTWISE; not "conv" (needs pointwise): a stride-1 conv2 as conv3x3.py's kernel
    conv3x3: str = "conv"

    @nn.compact
    def __call__(self, x, train: bool, sums=None):
        dt = self.dtype
        if self.pointwise != "conv":
            return self._pointwise(x, train, sums)
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

    def _pointwise(self, x, train: bool, sums):
        """The block with conv1 and conv3 as ``pointwise.bn_relu_matmul`` (bn1 and bn3 applied
        on their way in, the residual add and the next BatchNorm's sums on their way out):
        ``(out, out's channel sums in train mode, else None)``. ``sums``: x's, if known (a
        pair or ``batchnorm.Sums``). In train mode conv3 takes bn3 as its input's sums
        (``pointwise.bn_relu_matmul_from_sums``: its coefficients and derivative in one
        kernel each, ``bn_input``) and hands on its output's sums as its programs' shares;
        without the 3x3 kernel conv1 is ``pointwise.bn_relu_matmul_bn``, with bn2 + ReLU
        after it (its derivative taken in the backward kernel). With ``fold`` (evaluation)
        bn2 is applied on conv1's way out and bn3 folded into conv2, and ``out`` is a
        :class:`Pending` conv3: the next block's conv1 computes it in its own kernel
        (``chain.matmul_chain``), and ``x`` may be such a one. With ``conv3x3``
        (stride 1, not folded) conv2 is ``conv3x3.bn_relu_conv3x3``: bn2 applied on its way
        in, bn3's sums on its way out; in train mode conv1 and conv2 then take bn1 and bn2
        as sums too (``*_from_sums``)."""
        dt, impl = self.dtype, pointwise_impl(self.pointwise)
        coefficients = functools.partial(BatchNormCoefficients, not train, self.bn_momentum,
                                         BN_EPSILON)
        w1 = _ConvKernel(self.planes, name="conv1")(x.shape[-1])
        w3 = _ConvKernel(self.planes * EXPANSION, name="conv3")(self.planes)
        shortcut = conv(self.planes * EXPANSION, 1, self.stride, dtype=dt,
                        name="shortcut") if self.project else (lambda v: v)

        def from_sums(name, op, v, v_sums, *args, **options):
            """``op`` (a ``*_from_sums`` op: the BatchNorm ``name`` formed from ``v``'s sums,
            ``statistics_sums(v)`` where not given) with that BatchNorm's variables, its
            running statistics updated from the batch statistics ``op`` returns."""
            v_sums = statistics_sums(v) if v_sums is None else v_sums
            return BatchNormApplied(self.bn_momentum, BN_EPSILON, name=name)(
                v.shape[-1], lambda scale, bias, eps: op(v, v_sums, scale, bias, *args,
                                                         epsilon=eps, **options))

        def conv3(z2, sums2, residual):
            """conv3 with bn3 + ReLU before it: in train mode bn3 formed from its sums by
            the kernel's op (``bn_relu_matmul_from_sums``: its derivative beside the
            backward kernel's partial sums in one kernel)."""
            if not train:
                return pw.bn_relu_matmul(z2, *coefficients(name="bn3")(z2), w3, residual,
                                         impl=impl)
            return from_sums("bn3", pw.bn_relu_matmul_from_sums, z2, sums2, w3, residual,
                             stats=True, shares=True, impl=impl)

        if self.conv3x3 != "conv" and self.stride == 1 and not self.fold:
            w2 = _ConvKernel(self.planes, 3, name="conv2")(self.planes)
            if train:  # bn1 and bn2 formed by the kernels' ops from sums, as bn3 by conv3's
                z1, sums1, x = from_sums("bn1", pw.bn_relu_matmul_from_sums, x, sums, w1,
                                         stats=True, return_input=True, shares=True,
                                         impl=impl)
                z2, sums2 = from_sums("bn2", c3.bn_relu_conv3x3_from_sums, z1, sums1, w2,
                                      stats=True, shares=True,
                                      impl=pointwise_impl(self.conv3x3))
            else:
                z1, _, x = pw.bn_relu_matmul(x, *coefficients(name="bn1")(x), w1,
                                             return_input=True, impl=impl)
                z2, sums2 = c3.bn_relu_conv3x3(z1, *coefficients(name="bn2")(z1), w2,
                                               impl=pointwise_impl(self.conv3x3))
            return conv3(z2, sums2, shortcut(x))
        bn1 = coefficients(name="bn1")(x, sums)
        conv2 = conv(self.planes, 3, self.stride, dtype=dt, name="conv2")
        if self.fold:  # running statistics: only the channel count of bn2's and bn3's input
            channels = jax.ShapeDtypeStruct((self.planes,), dt)
            mean2, mul2, bias2 = coefficients(name="bn2")(channels)  # applied by conv1
            w1, b1 = fold_affine(w1, 0.0, mean2, mul2, bias2)
            if isinstance(x, Pending):  # the last block's conv3 in this conv1's kernel
                x, a2 = chain.matmul_chain(*x, *bn1, w1, b1, impl=impl)
            else:
                a2, _ = pw.bn_relu_matmul(x, *bn1, w1, out_bias=b1, out_relu=True,
                                          impl=impl)
            a3 = conv_folded(conv2, a2, *coefficients(name="bn3")(channels), relu=True)
            # a3 is normalised and activated already (conv3's map is the identity); conv3
            # runs in the next block's conv1 kernel, or at the head
            return Pending(a3, w3, shortcut(x)), None
        # the shortcut reads the x that conv1's kernel returns, so that the backward kernel
        # adds the shortcut's cotangent to x's (return_input)
        if train:  # bn2 applied after conv1's kernel, its derivative in the backward kernel
            a2, x = BatchNormApplied(self.bn_momentum, BN_EPSILON, name="bn2")(
                self.planes, functools.partial(pw.bn_relu_matmul_bn, x, *bn1, w1,
                                               return_input=True, impl=impl))
        else:
            z1, _, x = pw.bn_relu_matmul(x, *bn1, w1, return_input=True, impl=impl)
            a2 = pw.bn_relu(z1, *coefficients(name="bn2")(z1))
        return conv3(conv2(a2), None, shortcut(x))


class PreResNet(nn.Module):
    """PreResNet-(9n+2) with bottleneck blocks; ``depth=110`` is the MCU CIFAR model."""

    casts_kernels: ClassVar[bool] = True  # every layer casts its kernel to dtype

    num_classes: int
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    depth: int = 110
    # Evaluation mode only: the BatchNorms that directly follow a convolution (two of three
    # per block) are folded into it (layers.conv_bn); same variables, same function.
    fold_bn: bool = False
    fused_bn: bool = False  # train mode: BN + ReLU with a hand-written backward (batchnorm.py)
    # The blocks' 1x1 convolutions as one kernel with the BatchNorm + ReLU before them and
    # the statistics after them (POINTWISE, pointwise.py); the same variables and function.
    # With fold_bn, evaluation folds bn2 and bn3 into the kernel's output and conv2. fused_bn
    # has no effect with it, in either mode (no BatchNorm of its kind is left).
    pointwise: str = "conv"
    # With pointwise: the stride-1 blocks' 3x3 convolutions as one kernel with bn2 + ReLU
    # before them and bn3's statistics after them, and a backward kernel (POINTWISE,
    # conv3x3.py), except where fold_bn folds bn3 into them. The same variables and function.
    conv3x3: str = "conv"

    @nn.compact
    def __call__(self, x, train: bool):
        if (self.depth - 2) % 9 != 0 or self.depth < 11:
            raise ValueError(f"depth: got {self.depth}, expected 9n+2 with n >= 1 (11, 110, ...)")
        check_conv3x3(self.pointwise, self.conv3x3)  # checked before anything is built
        n = (self.depth - 2) // 9
        dt = resolve_dtype(self.dtype)
        fold = self.fold_bn and not train and not self.is_initializing()
        x = x.astype(dt)
        x = conv(16, 3, dtype=dt, name="stem")(x)
        sums = None  # with pointwise: the last block's output sums (train mode)
        for s, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2), strict=True)):
            for b in range(n):
                first = b == 0
                project = first and (stride != 1 or x.shape[-1] != planes * EXPANSION)
                block = PreActBottleneck(
                    planes,
                    stride if first else 1,
                    project,
                    dt,
                    self.bn_momentum,
                    fold,
                    self.fused_bn,
                    self.pointwise,
                    self.conv3x3,
                    name=f"stage{s + 1}_block{b}",
                )
                if self.pointwise == "conv":
                    x = block(x, train)
                else:
                    x, sums = block(x, train, sums)
        if self.pointwise == "conv":
            x = batch_norm(train, self.bn_momentum, dtype=dt, relu=True, fused=self.fused_bn,
                           name="final_bn")(x)
        else:
            x = resolved(x, pointwise_impl(self.pointwise))
            x = pw.bn_relu(x, *BatchNormCoefficients(not train, self.bn_momentum, BN_EPSILON,
                                                     name="final_bn")(x, sums))
        x = jnp.mean(x, axis=(1, 2))
        x = dense(self.num_classes, dtype=dt, name="head")(x)
        return x.astype(jnp.float32)


#: The paths (``pytrees.flatten``'s) of the blocks' 1x1 kernels that ``_ConvKernel`` makes.
_MATRIX_PATH = re.compile(r"stage\d+_block\d+/conv[13]/kernel")
#: Those of the 3x3 kernels of the stride-1 blocks (all but each later stage's first).
_TAPS_PATH = re.compile(r"stage(?:1_block\d+|\d+_block[1-9]\d*)/conv2/kernel")


def flax_order_kernels(model: PreResNet, paths: Iterable[str]) -> frozenset[str]:
    """The paths among ``paths`` of the 4-d kernels that ``model``'s Pallas kernels read in
    Flax's order: its blocks' conv1 and conv3 as (K, N) matrices where ``pointwise`` is not
    "conv" (``_ConvKernel``), and its stride-1 blocks' conv2 as nine (K, N) taps where
    ``conv3x3`` is not "conv" either; none otherwise."""
    if model.pointwise == "conv":
        return frozenset()
    taps = model.conv3x3 != "conv"
    return frozenset(p for p in paths
                     if _MATRIX_PATH.fullmatch(p) or (taps and _TAPS_PATH.fullmatch(p)))


def preresnet(depth: int, num_classes: int, **options: Any) -> PreResNet:
    """PreResNet of the given ``depth`` (9n+2: 11, 20, ..., 110, 164); options as ``create``."""
    if (depth - 2) % 9 != 0 or depth < 11:
        raise ValueError(f"depth: got {depth}, expected 9n+2 with n >= 1 (11, 110, ...)")
    return PreResNet(num_classes=num_classes, depth=depth, **options)
