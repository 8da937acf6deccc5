"""BatchNorm (optionally with its ReLU) whose train-mode gradient is written out by hand.

The same function and variables as ``flax.linen.BatchNorm`` (``params``: ``scale``,
``bias``; ``batch_stats``: ``mean``, ``var``; fast variance ``E[x^2] - E[x]^2`` in float32,
clipped at 0; running statistics ``momentum * old + (1 - momentum) * batch``), so models,
checkpoints and masks are unchanged. What differs is how many times a training step reads
and writes each activation, which bounds the curve step's speed (docs/benchmarks.md, "Where
the time goes"). Per BatchNorm + ReLU, in units of one activation's size:

- autodiff of the composed ops: the statistics (2 on XLA's CPU backend, where each sum is a
  library call; GPUs fuse sibling reductions), ``x - mean`` written for the backward pass
  (2), the normalised and activated output written (2), and a backward pass of 13 (the
  ReLU's gradient, three reductions, a product and ``dx`` as separate passes);
- here (``fused=True``): the statistics (1: one reduction reads ``x`` for both sums), one
  output written (2), and a backward pass
  of 6: one reduction over ``(dy, x)`` for the scale and bias gradients (2) and one
  elementwise pass ``dx = s / sigma * (dz - mean(dz) - xhat * mean(dz * xhat))`` (4, with a
  residual branch's gradient added in it, as in the count above), both recomputing ``xhat``
  and the ReLU mask from ``x``. Each pass computes its two sums together
  (:func:`channel_sums`), so a GPU runs two reduction kernels per pass instead of three.

PreResNet-110's curve step (batch 128, float32): XLA's byte count on the CPU backend falls
from 33.7 GB to 22.9 GB; compiled for an H100 it moves 0.96 of the bytes in 1,692 kernels
instead of 2,102 (docs/benchmarks.md). ``fused=False`` (the default until measured on a
GPU) and evaluation mode are ``nn.BatchNorm`` itself.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (last axis) sums of the float32 ``a`` and ``b`` in two stages: one
    variadic reduction over each example's positions (all but the first and last axes), so
    that both are read, and computed from what they are made of, in one pass; then one
    ``jnp.sum`` over the examples of the small ``(N, 2C)`` partial sums side by side (for
    ``(N, C)`` inputs, which have no positions, that sum alone).

    Why so: XLA's CPU backend adds up a reduction one element after another, and in two
    stages the rounding stays near ``jnp.sum``'s (over 131,072 values per channel, relative
    to the largest sum: one stage off by up to 9e-6, two by 7e-7, ``jnp.sum`` by 1e-7). A
    GPU compiles each stage as one kernel (for most layers), where the two sums of a pass
    took three kernels before; and as a layer's scale and bias gradients come out of one
    array, XLA updates both in one optimizer kernel. The PreResNet-110 curve step has 253
    kernels fewer (docs/benchmarks.md, "Fewer kernels in the fused BatchNorm")."""
    sums = channel_sums_side_by_side(a, b)
    return sums[:a.shape[-1]], sums[a.shape[-1]:]


def channel_sums_side_by_side(a: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`channel_sums` as one (2C,) array, ``a``'s sums then ``b``'s, as the second
    stage writes them (for a kernel that must read them as one buffer: a slice given to a
    custom kernel is a copy)."""
    a, b = _sum_pair(a, b, tuple(range(1, a.ndim - 1)))
    return jnp.sum(jnp.concatenate([a, b], axis=-1), 0)


def _sum_pair(a: jax.Array, b: jax.Array, axes: tuple[int, ...]):
    """``(a, b)`` (float32) each summed over ``axes`` in one variadic reduction, which reads
    both in one pass; unchanged for no axes."""
    if not axes:
        return a, b
    zero = jnp.zeros((), jnp.float32)
    return jax.lax.reduce((a, b), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]), axes)


class Sums(NamedTuple):
    """A BatchNorm input's channel sums as a kernel hands them on: the sums are
    ``sum(partials, 0) + (total, total_sq)``. ``partials`` (P, 2, C) float32: the shares of
    the kernel's programs (or None: ``total`` and ``total_sq`` are the sums), never
    differentiated; where they are given, ``total`` and ``total_sq`` (C,) are zero and carry
    the sums' derivative (their cotangents are the sums'). So the next kernel can add up the
    shares and form its BatchNorm's coefficients in one kernel of its own
    (``bn_input.coefficients_of``), where XLA takes two. :func:`totals` gives the sums."""

    total: Any
    total_sq: Any
    partials: Any = None


def totals(sums) -> tuple[jax.Array, jax.Array]:
    """The channels' ``(sum, sum of squares)`` of ``sums``: a pair, or :class:`Sums` (its
    shares added up, differentiated through ``total`` and ``total_sq`` alone)."""
    if not isinstance(sums, Sums):
        return tuple(sums)
    if sums.partials is None:
        return sums.total, sums.total_sq
    shares = jnp.sum(jax.lax.stop_gradient(sums.partials), 0)
    return shares[0] + sums.total, shares[1] + sums.total_sq


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance ``E[x^2] - E[x]^2`` (clipped at 0) in float32, as
    Flax computes them."""
    xf = x.astype(jnp.float32)
    return moments(*channel_sums(xf, jax.lax.square(xf)), x.size // x.shape[-1])


def moments(total, total_sq, n: int) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance ``E[x^2] - E[x]^2`` (clipped at 0) from the sum and the sum
    of squares of ``n`` values."""
    mean = total / n
    return mean, jnp.maximum(0.0, total_sq / n - jax.lax.square(mean))


def batch_coefficients(total, total_sq, scale, n: int, epsilon: float):
    """``(mean, var, mul)`` of a BatchNorm in train mode from the channels' sum and sum of
    squares over ``n`` values: :func:`moments`, then :func:`multiplier` (as
    :class:`BatchNormCoefficients` computes them)."""
    mean, var = moments(total, total_sq, n)
    return mean, var, multiplier(var, scale, epsilon)


def affine(x, mean, mul, bias) -> jax.Array:
    """``(x - mean) * mul + bias`` in float32: a BatchNorm's map with ``mul = rsqrt(var + eps)
    * scale`` (Flax's order of operations)."""
    return (x.astype(jnp.float32) - mean) * mul + bias


def multiplier(var, scale, epsilon: float) -> jax.Array:
    """``rsqrt(var + eps) * scale``: the factor of a BatchNorm's affine map (Flax's order of
    operations)."""
    return jax.lax.rsqrt(var + epsilon) * scale


def _pre_activation(x, mean, var, scale, bias, epsilon: float) -> jax.Array:
    """``(x - mean) * (rsqrt(var + eps) * scale) + bias`` in float32 (Flax's order of ops)."""
    return affine(x, mean, multiplier(var, scale, epsilon), bias)


def _normalize(x, mean, var, scale, bias, epsilon: float, relu: bool) -> jax.Array:
    """``[relu](bn(x))`` with the given statistics, in ``x``'s dtype (the ReLU after the cast,
    as ``nn.relu(nn.BatchNorm(...)(x))``)."""
    y = _pre_activation(x, mean, var, scale, bias, epsilon).astype(x.dtype)
    return nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     relu: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode ``[relu](bn(x))`` over the last axis, with the batch's ``(mean, var)``.

    ``x``: (..., C) in the compute dtype; ``scale``, ``bias``: (C,) float32. Returns
    ``(y, mean, var)``: ``y`` like ``x``, the statistics (C,) float32. Differentiable in
    ``x``, ``scale`` and ``bias`` (through the returned statistics too).
    """
    return _train(x, scale, bias, epsilon, relu)


def _train(x, scale, bias, epsilon, relu):
    mean, var = _stats(x)
    return _normalize(x, mean, var, scale, bias, epsilon, relu), mean, var


def _forward(x, scale, bias, epsilon, relu):
    y, mean, var = _train(x, scale, bias, epsilon, relu)
    return (y, mean, var), (x, mean, var, scale, bias)  # x, not x - mean, is kept for dx


def _backward(epsilon, relu, residuals, cotangents):
    x, mean, var, scale, bias = residuals
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    inv = jax.lax.rsqrt(var + epsilon)
    centred = x.astype(jnp.float32) - mean
    xhat = centred * inv
    dz = dz_dx = dy.astype(jnp.float32)
    if relu:  # the forward pass's pre-activation (cast as there), so the same mask
        z = _pre_activation(x, mean, var, scale, bias, epsilon).astype(x.dtype)
        dz = jnp.where(z > 0, dz, 0.0)
        # The same values, written differently so that XLA does not merge the two: each
        # consumer (the reduction, dx) then computes its own from dy and x instead of both
        # reading a materialised dz (2 activation-sized passes fewer on the CPU backend).
        dz_dx = jnp.where(z <= 0, 0.0, dz_dx)
    dbias, dscale = channel_sums(dz, dz * xhat)
    dx = (inv * scale) * (dz_dx - dbias / n - xhat * (dscale / n))
    # The statistics' own cotangents (zero when only y is used, as in the models):
    # d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n.
    dx = dx + dmean / n + centred * (2.0 * dvar / n)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` (the same fields and variables), optionally + ReLU.

    ``relu``: returns ``relu(bn(x))``. ``fused``: in train mode, the hand-written backward
    pass of this module's docstring, for the models' settings only (statistics over the
    last axis, an input already in ``dtype``, float32 or narrower; anything else is refused)
    and reverse-mode differentiation only (``jax.jvp`` cannot go through a custom VJP);
    otherwise, and in evaluation mode, Flax's own computation (then ``nn.relu``), bit for
    bit.
    """

    relu: bool = False
    fused: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        train = not nn.merge_param("use_running_average", self.use_running_average,
                                   use_running_average)
        if not (self.fused and train):
            y = super().__call__(x, use_running_average, mask=mask)
            return nn.relu(y) if self.relu else y
        if (mask is not None or x.ndim < 2 or self.axis != -1 or self.axis_name is not None
                or not (self.use_scale and self.use_bias and self.use_fast_variance
                        and self.force_float32_reductions)
                or self.dtype is None or jnp.dtype(x.dtype) != jnp.dtype(self.dtype)
                or jnp.dtype(x.dtype).itemsize > 4):
            raise ValueError(
                "BatchNorm(fused=True) covers the models' case only: statistics over all but "
                "the last axis of an input of 2 or more axes, no mask, no axis_name (a sharded "
                "jit needs none), scale, bias, fast variance, float32 reductions, and an input "
                "already in dtype (float32 or narrower); got "
                f"{self!r} on a {x.dtype}{list(x.shape)} input"
                f"{', with a mask' if mask is not None else ''}")
        ra_mean, ra_var, scale, bias = _variables(self, x.shape[-1], self.scale_init,
                                                  self.bias_init, self.param_dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.relu)
        _update(self, ra_mean, ra_var, mean, var)
        return y


def _variables(module: nn.Module, c: int, scale_init=nn.initializers.ones,
               bias_init=nn.initializers.zeros, param_dtype=jnp.float32):
    """nn.BatchNorm's variables for ``c`` channels, created in ``module`` as it creates
    them: ``(mean, var)`` (batch_stats variables) and ``(scale, bias)`` (params)."""
    ra_mean = module.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = module.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = module.param("scale", scale_init, (c,), param_dtype)
    bias = module.param("bias", bias_init, (c,), param_dtype)
    return ra_mean, ra_var, scale, bias


def _update(module: nn.Module, ra_mean, ra_var, mean, var) -> None:
    """nn.BatchNorm's running-statistics update (none while initialising)."""
    if not module.is_initializing():
        ra_mean.value = module.momentum * ra_mean.value + (1 - module.momentum) * mean
        ra_var.value = module.momentum * ra_var.value + (1 - module.momentum) * var


@jax.custom_vjp
def statistics_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The channels' (last axis) sum and sum of squares of ``x`` (2 or more axes) over all
    its other axes, in float32: a BatchNorm's statistics as sums (``moments`` makes them
    the mean and variance), for ``BatchNormCoefficients``.

    In variadic reductions, over each example's positions (where there are any) and then
    over the examples, so that no stage concatenates its two sums (as
    :func:`channel_sums` does: a kernel of its own on a GPU); and the derivative written
    out, ``d_sum + 2 x d_squares``, one elementwise expression that XLA fuses into its
    consumer, where autodiff's transpose of the two reductions wrote partial broadcasts.
    PreResNet-110's kernel step has 26 (bfloat16) to 38 (float32) kernels fewer for it
    (docs/benchmarks.md, "Fewer passes: the BatchNorm after the kernel in the backward
    kernel")."""
    if x.ndim < 2:
        raise ValueError(f"statistics_sums: x needs 2 or more axes (examples, ..., "
                         f"channels), got shape {x.shape}")
    xf = x.astype(jnp.float32)
    sums = _sum_pair(xf, jax.lax.square(xf), tuple(range(1, x.ndim - 1)))
    return _sum_pair(*sums, (0,))


def _statistics_sums_fwd(x):
    return statistics_sums(x), x


def _statistics_sums_bwd(x, cotangents):
    d_sum, d_squares = cotangents
    return ((d_sum + 2.0 * x.astype(jnp.float32) * d_squares).astype(x.dtype),)


statistics_sums.defvjp(_statistics_sums_fwd, _statistics_sums_bwd)


class BatchNormCoefficients(nn.Module):
    """``nn.BatchNorm``'s variables (the same names, shapes and initial values), returning the
    affine map it would apply instead of applying it: ``(mean, mul, bias)``, all (C,)
    float32, with ``bn(x) = (x - mean) * mul + bias`` and ``mul = rsqrt(var + eps) * scale``
    (Flax's order of operations). For a kernel that applies it on the way in
    (``pointwise.bn_relu_matmul``).

    In train mode the batch statistics come from ``sums`` (the channels' sum and sum of
    squares over ``n`` values, e.g. from the kernel that wrote ``x``) or, without them, from
    ``x`` itself (:func:`statistics_sums`; ``x`` is then read, with ``sums`` only its shape
    is); the running statistics are updated as ``nn.BatchNorm`` updates them (fast
    variance, clipped at 0).
    In evaluation mode only ``x``'s last axis is read (a ``jax.ShapeDtypeStruct`` will do).
    """

    use_running_average: bool
    momentum: float
    epsilon: float

    @nn.compact
    def __call__(self, x, sums=None):
        c = x.shape[-1]
        ra_mean, ra_var, scale, bias = _variables(self, c)
        if self.use_running_average:
            return ra_mean.value, multiplier(ra_var.value, scale, self.epsilon), bias
        mean, var, mul = batch_coefficients(*(statistics_sums(x) if sums is None
                                              else totals(sums)), scale, x.size // c,
                                            self.epsilon)
        _update(self, ra_mean, ra_var, mean, var)
        return mean, mul, bias


class BatchNormApplied(nn.Module):
    """``nn.BatchNorm``'s variables (the same names, shapes and initial values) for a
    train-mode BatchNorm that a function applies: ``apply(scale, bias, epsilon)`` returns
    ``(y, (mean, var), *rest)`` with the batch statistics it used, and this returns ``(y,
    *rest)`` after updating the running statistics as ``nn.BatchNorm`` does. For a kernel
    that applies it on its way out (``pointwise.bn_relu_matmul_bn``) or on its way in
    (``pointwise.bn_relu_matmul_from_sums``, ``conv3x3.bn_relu_conv3x3_from_sums``)."""

    momentum: float
    epsilon: float

    @nn.compact
    def __call__(self, channels: int, apply):
        ra_mean, ra_var, scale, bias = _variables(self, channels)
        y, (mean, var), *rest = apply(scale, bias, self.epsilon)
        _update(self, ra_mean, ra_var, mean, var)
        return (y, *rest)
