"""A 3x3 convolution with the BatchNorm + ReLU before it and the statistics after it, as one
GPU kernel (Pallas, Triton backend), for forward passes.

In PreResNet-110's bottleneck blocks the 3x3 convolution sits between the two 1x1 kernels of
``pointwise``. In the sweep's train-mode pass (BatchNorm statistics over many images, for
each t) XLA composes it of three passes over memory: bn2's normalise + ReLU reads conv1's
output ``z`` and writes the activated copy, cuDNN reads that and writes the convolution's
output, and bn3's statistics read the output again. Here one kernel reads ``z`` (B, H, W,
K), normalises and activates it in registers (``relu(z * mul + shift)``, as the 1x1 kernel
does, ``pointwise.bn_relu_shifted``), zero-pads it after the activation (as the
convolution's padding pads the activated input), convolves it with ``w`` (3, 3, K, N) as
nine products of shifted rows, writes the output once and, with ``stats``, returns the
channels' sum and sum of squares from the same pass (docs/benchmarks.md, "A fused kernel for
the 3x3 convolutions").

Each program computes a block of output pixels (rows of the (B*H*W, N) output) for all N
channels; for each of the nine taps it gathers the input rows its pixels read (``z``'s rows
shifted by ``(dy - 1) * W + (dx - 1)``, clamped to the array, with the pixels whose
neighbour lies outside the image masked to zero), so no padded copy of ``z`` is made.
Stride 1 and padding 1 only (the stride-2 blocks keep cuDNN).

There is no backward kernel: the derivative is that of the plain computation
(:func:`reference`, autodiff in XLA ops, which recomputes the activated input), so training
with this kernel computes the same as without it, but more slowly by the estimate. The curve
step keeps cuDNN (its backward pass takes bn2's derivative inside conv1's backward kernel,
``pointwise.bn_relu_matmul_bn``); the sweep, which runs forward passes only, is what this
kernel is for.

``impl`` (``kernel_impl``): "auto" the kernel where the program is compiled for an NVIDIA GPU
and the channel counts fit (:func:`kernel_fits`), the plain computation elsewhere; "pallas",
"interpret" (tests) and "xla" as in ``pointwise``. In a data-parallel program each device
runs the kernel on its own images (``pointwise.on_own_rows``). Block sizes follow a rule
(:func:`block_rows`) under which ptxas for the H100 finds no spills; untuned, and not yet
timed on a card.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mcu_jax import kernel_impl
from mcu_jax.models import pointwise as pw
from mcu_jax.models.batchnorm import statistics_sums

IMPLS = kernel_impl.IMPLS
TAPS = 9


def block_rows(k: int, n: int) -> int:
    """Output pixels a program computes, for channel counts that :func:`kernel_fits`: at
    most 128, and the float32 accumulator (rows x n) and each gathered input tile (rows x
    k) within 4,096 values (64 rows for K = N = 64, where 128 rows spilled registers in
    float32; ``experiments/kernel_registers.py``)."""
    return min(128, 4096 // max(k, n))


def kernel_fits(k: int, n: int) -> bool:
    """Whether the kernel takes ``k`` input and ``n`` output channels: powers of two from 16
    (Triton's products) to 64 (PreResNet's widest 3x3 convolution; wider tiles are not
    checked for spills)."""
    return all(16 <= v <= 64 and v & (v - 1) == 0 for v in (k, n))


def _check(z, mean, mul, bias, w) -> None:
    if z.ndim != 4:
        raise ValueError(f"bn_relu_conv3x3: z must be (B, H, W, K), got shape {z.shape}")
    k = z.shape[-1]
    if w.ndim != 4 or w.shape[:3] != (3, 3, k) or any(v.shape != (k,)
                                                       for v in (mean, mul, bias)):
        raise ValueError(f"bn_relu_conv3x3: z {z.shape} needs w (3, 3, {k}, N) and mean, mul, "
                         f"bias ({k},); got w {w.shape}, mean {mean.shape}, mul {mul.shape}, "
                         f"bias {bias.shape}")


def reference(z, mean, mul, bias, w, stats: bool = False):
    """The computation in XLA ops: ``(out (B, H, W, N) in z's dtype, (sum, sum of squares) of
    its channels in float32, or None)``, the convolution as ``nn.Conv`` (``layers.conv``)
    computes it and the sums as bn3 takes them without the kernel
    (``batchnorm.statistics_sums``); see :func:`bn_relu_conv3x3`."""
    _check(z, mean, mul, bias, w)
    a = pw.bn_relu(z, mean, mul, bias)
    out = jax.lax.conv_general_dilated(a, w.astype(z.dtype), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out, statistics_sums(out) if stats else None


def _pallas(z, mean, mul, bias, w, stats: bool, interpret: bool):
    """The Pallas kernel; arguments and results as :func:`reference`."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    _check(z, mean, mul, bias, w)
    b, h, width, k = z.shape
    n = w.shape[-1]
    if not kernel_fits(k, n):
        raise ValueError(f"bn_relu_conv3x3: the Pallas kernel needs K and N powers of two "
                         f"from 16 to 64; got K={k}, N={n} (impl='xla' takes any)")
    m, dt, rows = b * h * width, z.dtype, block_rows(k, n)
    grid = (pl.cdiv(m, rows),)

    def kernel(z_ref, mul_ref, shift_ref, w_ref, out_ref, *sums_ref):
        p = pl.program_id(0) * rows + jnp.arange(rows)  # this program's output pixels
        col, row = p % width, (p // width) % h
        mul_, shift = mul_ref[...], shift_ref[...]
        acc = jnp.zeros((rows, n), jnp.float32)
        for tap in range(TAPS):
            dy, dx = divmod(tap, 3)
            r, c = row + dy - 1, col + dx - 1
            inside = (p < m) & (r >= 0) & (r < h) & (c >= 0) & (c < width)
            source = jnp.clip(p + (dy - 1) * width + dx - 1, 0, m - 1)
            a = pw.bn_relu_shifted(z_ref[source, :], mul_, shift)
            a = jnp.where(inside[:, None], a, jnp.zeros((), dt))  # padding after the ReLU
            acc += jnp.dot(a, w_ref[tap], preferred_element_type=jnp.float32)
        out = acc.astype(dt)
        out_ref[...] = out
        if sums_ref:
            pw.write_row_sums(sums_ref[0], out, p < m)

    def whole(*shape):
        return pl.BlockSpec(shape, lambda i: (0,) * len(shape))

    out_specs = [pl.BlockSpec((rows, n), lambda i: (i, 0))]
    out_shape = [jax.ShapeDtypeStruct((grid[0] * rows, n), dt)]
    if stats:  # partial sums for each block of pixels, added up below in one reduction
        out_specs.append(pl.BlockSpec((None, 2, n), lambda i: (i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0], 2, n), jnp.float32))
    results = kernel_impl.pallas_call(
        kernel, z.reshape(m, k), mul, pw.shift_of(mean, mul, bias),
        w.reshape(TAPS, k, n).astype(dt), interpret=interpret, num_warps=4, grid=grid,
        in_specs=[whole(m, k), whole(k), whole(k), whole(TAPS, k, n)], out_specs=out_specs,
        out_shape=out_shape, name="bn_relu_conv3x3")
    return (results[0][:m].reshape(b, h, width, n),
            pw.total_row_sums(results[1]) if stats else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel(z, mean, mul, bias, w, stats, interpret):
    return _pallas(z, mean, mul, bias, w, stats, interpret)


def _kernel_fwd(z, mean, mul, bias, w, stats, interpret):
    return _pallas(z, mean, mul, bias, w, stats, interpret), (z, mean, mul, bias, w)


def _kernel_bwd(stats, interpret, saved, cotangents):
    """The derivative of the plain computation (no backward kernel)."""
    _, pullback = jax.vjp(functools.partial(reference, stats=stats), *saved)
    return pullback(cotangents)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def bn_relu_conv3x3(z, mean, mul, bias, w, *, stats: bool = False, impl: str = "auto"):
    """``conv3x3(relu((z - mean) * mul + bias), w)``, stride 1 and zero padding 1 (as
    ``layers.conv(n, 3)``), and with ``stats`` the output channels' ``(sum, sum of squares)``
    in float32 (else None). ``z``: (B, H, W, K) NHWC; ``mean``, ``mul``, ``bias``: (K,)
    float32 (a BatchNorm's statistics and ``scale / sqrt(var + eps)``); ``w``: (3, 3, K, N)
    HWIO, used in z's dtype. ``impl``: one of :data:`IMPLS` (module docstring). ValueError
    for shapes that do not fit."""
    kernel_impl.check("bn_relu_conv3x3", impl)
    _check(z, mean, mul, bias, w)
    args = (z, mean, mul, bias, w)

    def plain(*operands):
        return reference(*operands, stats=stats)

    if impl == "xla" or (impl == "auto" and not kernel_fits(*w.shape[2:])):
        return plain(*args)

    def kernel(*operands):
        return _kernel(*operands, stats, impl == "interpret")

    compute = functools.partial(kernel_impl.dispatch, impl, kernel, plain)
    axes = pw.row_axes(z.shape[0])
    return (pw.on_own_rows(compute, axes, (True, False, False, False, False))
            if axes else compute)(*args)
