"""Building blocks shared by every model: compute-dtype handling, initialisers, conv and BN.

All layers keep their parameters in float32 (``param_dtype``) and compute in the model's
``dtype``; every BatchNorm lives in the ``batch_stats`` collection and takes the model's
``bn_momentum`` so that ``model.clone(bn_momentum=0.0)`` writes exact batch statistics.

:func:`conv_bn` is a convolution followed by a BatchNorm; in evaluation mode with folding on
(the models' ``fold_bn`` field) the BatchNorm's running statistics and affine parameters are
folded into the convolution's kernel and a bias, so the pair is one convolution (on GPUs
XLA then fuses the bias and a following ReLU into the cuDNN call instead of a separate
normalise pass). The variables are the same either way; only the computation changes.
BatchNorm itself is ``batchnorm.BatchNorm`` (``nn.BatchNorm``'s variables and function, with
an optional ReLU and a train-mode backward pass that moves fewer bytes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mcu_jax.models.batchnorm import BatchNorm, multiplier

#: Compute dtypes a model accepts, by name.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

#: He (Kaiming) normal with fan-out, the usual initialiser of ReLU conv nets (torchvision,
#: Garipov et al.): N(0, 2 / (k * k * out_channels)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

BN_EPSILON = 1e-5  # PyTorch's default, which the reference models use


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Return the compute dtype named by ``dtype`` (a string, numpy or jnp dtype).

    Raises ValueError for anything but float32 / bfloat16 / float16.
    """
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype: got {dtype!r}, expected one of {sorted(COMPUTE_DTYPES)} "
            "(the compute dtype; parameters are always float32)"
        )
    return jnp.dtype(COMPUTE_DTYPES[name])


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    dtype: Any,
    use_bias: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A square conv with PyTorch-style symmetric padding ``kernel // 2``.

    Explicit padding (not "SAME") keeps strided convs sampling the same pixels as the
    PyTorch reference models.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


def batch_norm(train: bool, momentum: float, *, dtype: Any, relu: bool = False,
               fused: bool = False, name: str | None = None) -> BatchNorm:
    """BatchNorm over NHWC channels (``relu``: followed by a ReLU); batch statistics in train
    mode, running ones in eval.

    Running statistics are ``momentum * old + (1 - momentum) * batch`` with the biased batch
    variance, so ``momentum=0.0`` stores exactly the current batch's mean and variance.
    ``batchnorm.BatchNorm`` has ``nn.BatchNorm``'s variables and function; ``fused`` gives
    it a hand-written backward pass that moves fewer bytes (with the ReLU inside, that pass
    recomputes its mask instead of storing it); the models' ``fused_bn`` field.
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        relu=relu,
        fused=fused,
        name=name,
    )


def dense(features: int, *, dtype: Any, name: str | None = None, **kwargs) -> nn.Dense:
    """A float32-parameter Dense layer computing in ``dtype``."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name, **kwargs)


def conv_bn(conv_layer: nn.Conv, bn_layer: BatchNorm, x, fold: bool):
    """``bn_layer(conv_layer(x))`` (with its ReLU when ``bn_layer.relu``); with ``fold``
    (evaluation mode only, variables already there) one convolution with kernel ``k * s`` and
    bias ``(b - mean) * s + beta``, where ``s = scale / sqrt(var + eps)`` per output channel
    and ``b`` the conv's own bias (0 if none), then the ReLU: the same function, rounded
    differently."""
    if not fold:
        return bn_layer(conv_layer(x))
    stats, affine = bn_layer.variables["batch_stats"], bn_layer.variables["params"]
    mul = multiplier(stats["var"], affine["scale"], bn_layer.epsilon)
    return conv_folded(conv_layer, x, stats["mean"], mul, affine["bias"], bn_layer.relu)


def conv_folded(conv_layer: nn.Conv, x, mean, mul, bias, relu: bool):
    """``conv_layer(x)`` followed by the BatchNorm map ``(y - mean) * mul + bias`` (then a
    ReLU if ``relu``) as one convolution: kernel ``k * mul`` and bias ``(b - mean) * mul +
    bias``, ``b`` the conv's own bias (0 if none). Its variables must exist (evaluation)."""
    kernel = conv_layer.variables["params"]["kernel"]
    own = conv_layer.variables["params"].get("bias", jnp.zeros(kernel.shape[-1], kernel.dtype))
    kernel, own = fold_affine(kernel, own, mean, mul, bias)
    out = conv_layer.clone(use_bias=True, parent=None).apply(
        {"params": {"kernel": kernel, "bias": own}}, x)
    return nn.relu(out) if relu else out


def fold_affine(kernel, own_bias, mean, mul, bias):
    """``(kernel * mul, (own_bias - mean) * mul + bias)``: a linear layer (any kernel whose
    last axis is its output channels) followed by the BatchNorm map ``(y - mean) * mul +
    bias``, as one layer."""
    return kernel * mul, (own_bias - mean) * mul + bias
