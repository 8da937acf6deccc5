"""A train-mode BatchNorm that a kernel applies on its way in, given its input's sums: its
coefficients formed in one kernel, and its derivative with the kernel's partial sums in one.

``pointwise`` and ``conv3x3`` kernels apply a BatchNorm + ReLU to their input ``z`` as
``relu((z - mean) * mul + bias)``. With ``(mean, mul, bias)`` formed by XLA from the
channels' sums (``batchnorm.batch_coefficients``) and differentiated by autodiff, each such
BatchNorm took four small kernels of its own in a training step: the reduction of the
partial sums that the kernel writing ``z`` returns and the coefficients; in the backward
pass the reduction of the backward kernel's partial sums (its weight gradient's and ``sum
d_x``, ``sum d_x * (z - mean)``, ``d_x`` the cotangent of the affine map's output) and the
coefficients' derivative. A custom kernel reads whole buffers, so XLA fuses into it
nothing, and it gives no reduction an elementwise epilogue.

:func:`apply` is such a kernel with its BatchNorm given as its input's sums, scale and bias:
one ``custom_vjp``. Where the kernel that wrote ``z`` hands on its programs' shares of the
sums (``batchnorm.Sums``, :func:`shares_of`), one Pallas kernel adds them up and forms the
coefficients (:func:`coefficients_of`). The backward pass runs the kernel's backward kernel
and then :func:`finish`, one Pallas kernel that adds up its partial sums and forms the
sums' cotangents (:func:`moments_cotangents`), the scale's and bias's gradients and the
weight gradient, each a buffer of its own. docs/benchmarks.md, "Fewer kernels: each
BatchNorm's coefficients and derivative in one kernel".
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mcu_jax import kernel_impl
from mcu_jax.kernel_impl import sums_or_none
from mcu_jax.models.batchnorm import Sums, batch_coefficients, totals


def moments_cotangents(mean, raw, mul, d_offset, d_mul, n: int, epsilon: float,
                       d_mean=0.0, d_var=0.0):
    """The cotangents ``(d_sum, d_squares)`` of a train-mode BatchNorm's statistics sums (over
    ``n`` values; ``mean`` and ``raw``, the variance before its clip at zero, come from
    them) from those of its affine map's offset and multiplier (``d_offset = sum d_pre``,
    ``d_mul = sum d_pre * (x - mean)``, ``d_pre`` the cotangent of its pre-activation) and
    of the batch mean and variance (``d_mean``, ``d_var``): ``batch_coefficients``'
    derivative, written with ``mul`` in place of the scale (d mul / d var = -mul / (2 (var +
    eps))), the clip as ``jnp.maximum``'s (half at a tie). Elementwise on (C,) values, so
    that kernels can compute it."""
    f32 = jnp.float32
    var = jnp.maximum(0.0, raw)
    d_raw = (d_var - 0.5 * d_mul * mul / (var + epsilon)) * jnp.where(
        raw > 0, f32(1.0), jnp.where(raw == 0, f32(0.5), f32(0.0)))
    return (d_mean - mul * d_offset - 2.0 * mean * d_raw) / n, d_raw / n


def finish(sums, d_w, mean, raw, mul, n: int, epsilon: float, impl: str, d_mean=None,
           d_var=None):
    """A backward kernel's partial sums added up and taken through its BatchNorm:
    ``(d_sum, d_squares, d_bias, d_scale, d_w)``, each a buffer of its own: the statistics
    sums' cotangents (:func:`moments_cotangents`), the bias's and scale's gradients (``sum
    d_x`` and ``sum d_x * (z - mean) / sqrt(var + eps)``, ``d_x`` the cotangent of the
    affine map's output; each (K,)) and the weight gradient ``d_w`` (summed over the first
    axis, or None). ``sums`` (P, 2, K) and
    ``d_w`` (P, ...): the programs' shares; ``mean``, ``raw``, ``mul`` (K,): the forward
    pass's (:func:`moments_cotangents`); ``d_mean``, ``d_var`` (K,): the cotangents of the
    batch mean and variance the BatchNorm returned, or None (zero). ``impl``: "xla" (XLA's
    reductions), "pallas" (one kernel, :func:`_pallas_finish`) or "interpret"."""
    kernel_impl.check_explicit("finish", impl)
    p, _, k = sums.shape
    if impl == "xla":
        d_bias, d_mul = jnp.sum(sums, 0)
        given = (0.0 if d_mean is None else d_mean, 0.0 if d_var is None else d_var)
        return (*_cotangents(mean, raw, mul, d_bias, d_mul, n, epsilon, *given),
                None if d_w is None else jnp.sum(d_w, 0))
    flat = None if d_w is None else d_w.reshape(p, -1)
    *results, total = _pallas_finish(sums.reshape(p, 2 * k), flat, mean, raw, mul, d_mean,
                                     d_var, n, epsilon, impl == "interpret")
    return (*results, None if d_w is None else total.reshape(d_w.shape[1:]))


def _cotangents(mean, raw, mul, d_bias, d_mul, n: int, epsilon: float, d_mean, d_var):
    """:func:`finish`'s ``(d_sum, d_squares, d_bias, d_scale)`` from the totals ``d_bias =
    sum d_x`` and ``d_mul = sum d_x * (z - mean)``."""
    d_scale = d_mul * jax.lax.rsqrt(jnp.maximum(0.0, raw) + epsilon)
    return (*moments_cotangents(mean, raw, mul, d_bias, d_mul, n, epsilon, d_mean, d_var),
            d_bias, d_scale)


def finish_blocks(p: int, width: int) -> tuple[int, int]:
    """``(block, chunk)`` of :func:`_pallas_finish` for ``p`` rows of partial sums
    ``width`` wide: ``block`` columns a program adds up (a power of two dividing ``width``,
    at most 1,024, and ``p`` x ``block`` within 16,384 values, about 64 KB a program to
    read) in steps of ``chunk`` rows (a power of two dividing ``p``, ``chunk`` x ``block``
    within 4,096 values). Untuned."""
    block = min(width & -width, 1024, max(16, _power_of_two(16384 // p)))
    return block, min(p & -p, max(1, 4096 // block))


def _power_of_two(v: int) -> int:
    """The largest power of two at most ``v`` (1 for ``v`` under 2)."""
    return 2 ** int(math.log2(max(1, v)))


def _row_sums(ref, p: int, rows: int, columns, size: int):
    """In a kernel: the ``p`` rows of ``ref`` added up over ``columns`` (``size`` wide), in
    float32 and in steps of ``rows`` rows (a divisor of ``p``)."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    def step(j, acc):
        return acc + jnp.sum(ref[pl.ds(j * rows, rows), columns].astype(jnp.float32), axis=0)

    return jax.lax.fori_loop(0, p // rows, step, jnp.zeros((size,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("n", "epsilon", "interpret"))
def _pallas_finish(sums, d_w, mean, raw, mul, d_mean, d_var, n: int, epsilon: float,
                   interpret: bool):
    """:func:`finish` as one Pallas kernel, ``sums`` (P, 2K) and ``d_w`` (P, X) or None:
    program 0 adds up ``sums`` and forms the sums' cotangents, each other program adds up
    one block of ``d_w``'s columns (:func:`finish_blocks`)."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    p, k = sums.shape[0], sums.shape[1] // 2
    f32 = jnp.float32
    width = 0 if d_w is None else d_w.shape[1]
    block, chunk = finish_blocks(p, width) if width else (0, 0)
    sums_chunk = min(p & -p, max(1, 4096 // k))
    given = [(name, v) for name, v in (("d_mean", d_mean), ("d_var", d_var)) if v is not None]

    def kernel(sums_ref, *refs):
        dw_ref, refs = (refs[0], refs[1:]) if width else (None, refs)
        mean_ref, raw_ref, mul_ref, *refs = refs
        ins = dict(zip((name for name, _ in given), refs[:len(given)], strict=False))
        d_sum_ref, d_squares_ref, d_bias_ref, d_scale_ref, *total_ref = refs[len(given):]
        first = pl.program_id(0) == 0

        @pl.when(first)
        def _():
            (d_sum_ref[...], d_squares_ref[...], d_bias_ref[...],
             d_scale_ref[...]) = _cotangents(
                mean_ref[...], raw_ref[...], mul_ref[...],
                _row_sums(sums_ref, p, sums_chunk, pl.ds(0, k), k),
                _row_sums(sums_ref, p, sums_chunk, pl.ds(k, k), k), n, epsilon,
                *(ins[name][...] if name in ins else 0.0 for name in ("d_mean", "d_var")))

        if width:
            @pl.when(jnp.logical_not(first))
            def _():
                total_ref[0][...] = _row_sums(dw_ref, p, chunk, slice(None), block)

    def whole(*shape):
        return pl.BlockSpec(shape, lambda i: (0,) * len(shape))

    def columns(i):  # program i > 0 adds up block i - 1 (program 0 maps to block 0 unread)
        return jnp.maximum(i - 1, 0)

    in_specs = [whole(p, 2 * k)]
    args = [sums]
    if width:
        in_specs.append(pl.BlockSpec((p, block), lambda i: (0, columns(i))))
        args.append(d_w)
    in_specs += [whole(k)] * (3 + len(given))
    args += [mean, raw, mul, *(v for _, v in given)]
    out_specs = [whole(k)] * 4
    out_shape = [jax.ShapeDtypeStruct((k,), f32)] * 4
    if width:
        out_specs.append(pl.BlockSpec((block,), lambda i: (columns(i),)))
        out_shape.append(jax.ShapeDtypeStruct((width,), f32))
    results = kernel_impl.pallas_call(
        kernel, *args, interpret=interpret, num_warps=4, grid=(1 + width // max(block, 1),),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name="bn_finish")
    return (*results[:4], results[4] if width else None)


def coefficients(total, total_sq, scale, n: int, epsilon: float):
    """``(mean, var, mul, raw)``: ``batch_coefficients``' and the variance before its clip at
    zero (for the clip's derivative)."""
    mean, var, mul = batch_coefficients(total, total_sq, scale, n, epsilon)
    return mean, var, mul, total_sq / n - mean * mean


def coefficients_of(partials, scale, bias, n: int, epsilon: float, impl: str):
    """``(mean, var, mul, shift, raw)`` (each (K,) float32, a buffer of its own) of a
    train-mode BatchNorm over ``n`` values from a kernel's programs' shares of its input's
    sums, ``partials`` (P, 2, K): :func:`coefficients` and ``shift = bias - mean * mul``
    (the affine map as the kernels apply it, ``pointwise.shift_of``), with the shares added
    up in the same kernel ("pallas", "interpret": :func:`_pallas_coefficients`) or by XLA
    ("xla")."""
    kernel_impl.check_explicit("coefficients_of", impl)
    if impl == "xla":
        total, total_sq = jnp.sum(partials, 0)
        mean, var, mul, raw = coefficients(total, total_sq, scale, n, epsilon)
        return mean, var, mul, bias - mean * mul, raw
    p, _, k = partials.shape
    return _pallas_coefficients(partials.reshape(p, 2 * k), scale, bias, n, epsilon,
                                impl == "interpret")


def coefficient_blocks(p: int, k: int) -> tuple[int, int]:
    """``(block, chunk)`` of :func:`_pallas_coefficients` for ``p`` rows of shares of ``k``
    channels: ``block`` channels a program takes (a power of two dividing ``k``, from 16,
    and ``p`` x 2 ``block`` within 32,768 values where it can, about 128 KB a program to
    read), in steps of ``chunk`` rows (a power of two dividing ``p``, ``chunk`` x
    ``block`` within 4,096 values). Untuned."""
    block = min(k, max(16, _power_of_two(16384 // p)))
    return block, min(p & -p, max(1, 4096 // block))


@functools.partial(jax.jit, static_argnames=("n", "epsilon", "interpret"))
def _pallas_coefficients(partials, scale, bias, n: int, epsilon: float, interpret: bool):
    """:func:`coefficients_of` as one Pallas kernel, ``partials`` (P, 2K): each program adds
    up one block of channels' shares (:func:`coefficient_blocks`) and forms their
    coefficients."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    p, k = partials.shape[0], partials.shape[1] // 2
    f32 = jnp.float32
    block, chunk = coefficient_blocks(p, k)

    def kernel(partials_ref, scale_ref, bias_ref, mean_ref, var_ref, mul_ref, shift_ref,
               raw_ref):
        start = pl.program_id(0) * block
        total, total_sq = (_row_sums(partials_ref, p, chunk, pl.ds(at, block), block)
                           for at in (start, k + start))
        mean, var, mul, raw = coefficients(total, total_sq, scale_ref[...], n, epsilon)
        mean_ref[...], var_ref[...], mul_ref[...], raw_ref[...] = mean, var, mul, raw
        shift_ref[...] = bias_ref[...] - mean * mul

    channels = pl.BlockSpec((block,), lambda i: (i,))
    return tuple(kernel_impl.pallas_call(
        kernel, partials, scale, bias, interpret=interpret, num_warps=4, grid=(k // block,),
        in_specs=[pl.BlockSpec((p, 2 * k), lambda i: (0, 0)), channels, channels],
        out_specs=[channels] * 5, out_shape=[jax.ShapeDtypeStruct((k,), f32)] * 5,
        name="bn_coefficients"))


def shares_of(partials) -> Sums:
    """A kernel's programs' shares of its output's sums, ``partials`` (P, 2, N), as it hands
    them on (:class:`Sums`: the totals zero, carrying the sums' derivative)."""
    zero = jnp.zeros(partials.shape[2], jnp.float32)
    return Sums(zero, zero, partials)


def as_partials(total, total_sq, p: int) -> Sums:
    """Sums given whole as :class:`Sums` with ``p`` rows of shares (the first row the sums,
    the others zero; ``total`` and ``total_sq`` then zero, carrying the derivative): the
    structure a kernel's shares have, for a computation that must return what the kernel
    returns (``kernel_impl.dispatch``'s two branches)."""
    stacked = jax.lax.stop_gradient(jnp.stack([total, total_sq]))
    partials = jnp.zeros((p, *stacked.shape), stacked.dtype).at[0].set(stacked)
    return Sums(total - jax.lax.stop_gradient(total),
                total_sq - jax.lax.stop_gradient(total_sq), partials)


#: The operands of :func:`apply` before the kernel's own, in order.
OPERANDS = ("z", "total", "total_sq", "partials", "scale", "bias")


def _with_statistics(outputs, mean, var):
    """``op``'s outputs with the batch statistics ``(mean, var)`` second, as ``apply``
    returns them."""
    return (outputs[0], (mean, var), *outputs[1:])


def _forward(op, flags, impl, epsilon, z, total, total_sq, partials, scale, bias, *rest):
    """``(outputs, residuals, (mean, mul, raw))``: the coefficients from the sums (by
    XLA, ``op``'s kernel forming the shift) or their shares (:func:`coefficients_of`), then
    ``op``'s forward pass."""
    n = z.size // z.shape[-1]
    if partials is None:
        (mean, var, mul, raw), shift = coefficients(total, total_sq, scale, n, epsilon), None
    else:
        mean, var, mul, shift, raw = coefficients_of(partials, scale, bias, n, epsilon, impl)
    outputs, residuals = op.forward(flags, z, mean, mul, bias, *rest, shift=shift)
    return _with_statistics(outputs, mean, var), residuals, (mean, mul, raw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _apply(op, flags, impl, epsilon, *operands):
    return _forward(op, flags, impl, epsilon, *operands)[0]


def _apply_fwd(op, flags, impl, epsilon, *primals):
    """With symbolic zeros: the names of the perturbed operands travel to the backward pass
    (as ``pointwise.perturbed``'s)."""
    values = [p.value if p is not None else None for p in primals]
    outputs, residuals, moments = _forward(op, flags, impl, epsilon, *values)
    # the perturbed operands' names and dtypes, as the keys of an empty dict: static, in the
    # residuals' structure
    wanted = {(name, p.value.dtype): None for name, p in zip((*OPERANDS, *op.names),
                                                             primals, strict=True)
              if p is not None and p.perturbed}
    return outputs, (residuals, *moments, wanted)


def _apply_bwd(op, flags, impl, epsilon, saved, cotangents):
    """The kernel's backward kernel (``op.backward``, its partial sums unreduced), then
    :func:`finish`: the sums' cotangents, the bias's gradient (``sum d_x``), the scale's
    (``sum d_x * (z - mean) / sqrt(var + eps)``) and the weight gradient. The shares of
    the sums, if given, get none."""
    residuals, mean, mul, raw, wanted = saved
    dtypes = dict(wanted.keys())
    d_out, d_statistics, *rest = cotangents
    d_z, d_rest, sums, d_w = op.backward(flags, residuals, (d_out, *rest), tuple(dtypes))
    n = residuals[0].size // residuals[0].shape[-1]
    d_total, d_total_sq, d_bias, d_scale, d_w = finish(
        sums, d_w, mean, raw, mul, n, epsilon, impl, *sums_or_none(d_statistics))
    grads = (d_z, d_total, d_total_sq, None, d_scale, d_bias,
             *(d_w if name == "w" else d for name, d in zip(op.names, d_rest, strict=True)))
    return tuple(None if g is None or name not in dtypes else g.astype(dtypes[name])
                 for name, g in zip((*OPERANDS, *op.names), grads, strict=True))


_apply.defvjp(_apply_fwd, _apply_bwd, symbolic_zeros=True)


def apply(op, flags, epsilon: float, z, sums, scale, bias, *rest, impl: str = "pallas"):
    """``op``'s kernel with its BatchNorm's coefficients formed from ``sums`` (z's channels'
    sum and sum of squares over all its rows, float32: a pair or ``batchnorm.Sums``; given
    as the shares of the kernel that wrote ``z``, the coefficients are formed in one kernel
    that adds them up, :func:`coefficients_of`), ``scale`` and ``bias`` (K,): the batch mean
    and ``mul = scale / sqrt(var + epsilon)`` as ``batch_coefficients`` forms them (fast
    variance, clipped at 0). Returns ``op``'s outputs with the batch statistics ``(mean,
    var)`` second (for the running statistics: ``batchnorm.BatchNormApplied``).
    Differentiated in every operand but the shares, with the partial sums of ``op``'s
    backward kernel added up and taken through the coefficients in one kernel
    (:func:`finish`).

    ``op``: a class with ``names`` (its operands after ``bias``, among them "w", whose
    gradient its backward kernel returns as partial sums), ``forward(flags, z, mean, mul,
    bias, *rest, shift) -> (outputs, residuals)`` (``residuals[0]`` is ``z``; ``shift``:
    ``bias - mean * mul`` or None, for the kernel to form), ``backward(flags, residuals,
    cotangents, wanted) -> (d_z, d_rest, sums (P, 2, K), d_w (P, ...) or None)``
    (``d_rest`` in ``names``' order, None for "w" and for operands not in ``wanted``);
    ``flags``: hashable, static. ``impl``: this module's kernels' ("pallas" or
    "interpret").

    ``Sums`` with shares must have zero ``total`` and ``total_sq`` (as :func:`shares_of` and
    :func:`as_partials` make them): the coefficients are formed from the shares alone."""
    kernel_impl.check_explicit("apply", impl)
    sums = sums if isinstance(sums, Sums) else Sums(*sums)
    return _apply(op, flags, impl, epsilon, z, *sums, scale, bias, *rest)


def from_sums(op, flags, epsilon: float, plain, impl: str, composed: bool, rows, z, sums,
              scale, bias, *rest):
    """A kernel's op with its BatchNorm given as sums (``pointwise.bn_relu_matmul_from_sums``,
    ``conv3x3.bn_relu_conv3x3_from_sums``): :func:`apply` where the kernels run, else the
    coefficients by ``batch_coefficients`` and ``plain(z, mean, mul, bias, *rest, impl=)``,
    the op's computation from given coefficients, which returns ``(out, out's sums or None,
    *more)``; either way ``(out, (mean, var), out's sums, *more)``. ``composed``: run the
    latter alone (XLA's ops, kernels that do not fit, a data-parallel program); else
    ``kernel_impl.dispatch`` picks by ``impl``, its XLA branch handing on the output's sums
    as ``rows`` shares (:func:`as_partials`; None: as they are) so that both branches return
    one structure."""
    args = (z, sums if isinstance(sums, Sums) else tuple(sums), scale, bias, *rest)

    def xla(z, sums, scale, bias, *rest, impl=impl, rows=None):
        mean, var, mul = batch_coefficients(*totals(sums), scale, z.size // z.shape[-1],
                                            epsilon)
        out, out_sums, *more = plain(z, mean, mul, bias, *rest, impl=impl)
        if rows is not None and out_sums is not None:
            out_sums = as_partials(*out_sums, rows)
        return (out, (mean, var), out_sums, *more)

    if composed:
        return xla(*args)
    kernel = functools.partial(apply, op, flags, epsilon,
                               impl="interpret" if impl == "interpret" else "pallas")
    return kernel_impl.dispatch(impl, kernel, functools.partial(xla, impl="xla", rows=rows),
                                *args)
