"""A 3x3 convolution with the BatchNorm + ReLU before it and the statistics after it, as one
GPU kernel (Pallas, Triton backend), with a backward kernel.

In PreResNet-110's bottleneck blocks the 3x3 convolution sits between the two 1x1 kernels of
``pointwise``. XLA composes it of three passes over memory: bn2's normalise + ReLU reads
conv1's output ``z`` and writes the activated copy, cuDNN reads that and writes the
convolution's output, and bn3's statistics read the output again; its derivative takes four
more (bn3's part of the output's cotangent, cuDNN's two backward convolutions, bn2's
reduction). Here one kernel reads ``z`` (B, H, W, K), normalises and activates it in
registers (``relu(z * mul + shift)``, as the 1x1 kernel does,
``pointwise.bn_relu_shifted``), zero-pads it after the activation (as the convolution's
padding pads the activated input), convolves it with ``w`` (3, 3, K, N) as nine products of
shifted rows, writes the output once and, with ``stats``, returns the channels' sum and sum
of squares from the same pass (docs/benchmarks.md, "A fused kernel for the 3x3
convolutions"). Its backward kernel (:func:`_pallas_backward`) reads the output's cotangent,
``z`` and, for the sum of squares' part, the output, and writes ``z``'s cotangent once, with
the weight gradient and bn2's gradient sums as partial sums (docs/benchmarks.md, "A backward
kernel for the 3x3 convolutions").

Each program computes a block of output pixels (rows of the (B*H*W, N) output) for all N
channels; for each of the nine taps it gathers the input rows its pixels read (``z``'s rows
shifted by ``(dy - 1) * W + (dx - 1)``, clamped to the array, with the pixels whose
neighbour lies outside the image masked to zero), so no padded copy of ``z`` is made.
Stride 1 and padding 1 only (the stride-2 blocks keep cuDNN).

In train mode the model calls :func:`bn_relu_conv3x3_from_sums`, which takes bn2 as conv1's
programs' shares of its input's sums, scale and bias, forms its coefficients in one kernel
and its derivative beside the backward kernel's partial sums in one more (``bn_input``).

Training with the kernels (``ProblemConfig.conv3x3``, the model's ``conv3x3``) computes
the same function as without them, rounded differently; the backward kernel recomputes the
ReLU's mask in the kernels' form (``bn_relu_shifted``), so it may differ where a value lies
within rounding of zero, as for the 1x1 kernels.

``impl`` (``kernel_impl``): "auto" the kernel where the program is compiled for an NVIDIA GPU
and the channel counts fit (:func:`kernel_fits`), the plain computation elsewhere; "pallas",
"interpret" (tests) and "xla" as in ``pointwise``. In a data-parallel program each device
runs the kernel on its own images (``pointwise.on_own_rows``). Both kernels are jitted
functions, built once per shape in a trace, as ``pointwise``'s. Block sizes follow a rule
(:func:`block_rows`, :func:`backward_blocks`) under which ptxas for the H100 finds no
spills beyond a word; untuned, and not yet timed on a card.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mcu_jax import kernel_impl
from mcu_jax.kernel_impl import dense, sums_or_none
from mcu_jax.models import bn_input
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


def _inside(row, col, h: int, width: int):
    """Whether pixel coordinates ``(row, col)`` (arrays) lie inside an h x width image."""
    return (row >= 0) & (row < h) & (col >= 0) & (col < width)


def _tap_input(z_ref, p, row, col, tap: int, valid, mul, shift, h: int, width: int):
    """In a kernel: the activated input (rows, K) that output pixels ``p`` (rows; at image
    ``row``, ``col``) read at ``tap``: ``relu(z * mul + shift)`` of z's row shifted by the
    tap (clamped to the array), zero where that neighbour lies outside the image (the
    convolution's padding, after the ReLU) or where not ``valid``."""
    dy, dx = divmod(tap, 3)
    inside = valid & _inside(row + dy - 1, col + dx - 1, h, width)
    m = z_ref.shape[0]
    a = pw.bn_relu_shifted(z_ref[jnp.clip(p + (dy - 1) * width + dx - 1, 0, m - 1), :], mul,
                           shift)
    return jnp.where(inside[:, None], a, jnp.zeros((), a.dtype))


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


@functools.partial(jax.jit, static_argnames=("stats", "interpret", "partials"))
def _pallas(z, mean, mul, bias, w, stats: bool, interpret: bool, shift=None,
            partials: bool = False):
    """The Pallas kernel; arguments and results as :func:`reference`, but ``shift`` and
    ``partials`` as ``pointwise._pallas``'s (:func:`partial_rows` shares)."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    _check(z, mean, mul, bias, w)
    b, h, width, k = z.shape
    n = w.shape[-1]
    if not kernel_fits(k, n):
        raise ValueError(f"bn_relu_conv3x3: the Pallas kernel needs K and N powers of two "
                         f"from 16 to 64; got K={k}, N={n} (impl='xla' takes any)")
    m, dt, rows = b * h * width, z.dtype, block_rows(k, n)
    grid = (partial_rows(m, k, n),)

    def kernel(z_ref, mul_ref, shift_ref, w_ref, out_ref, *sums_ref):
        p = pl.program_id(0) * rows + jnp.arange(rows)  # this program's output pixels
        col, row = p % width, (p // width) % h
        mul_, shift = mul_ref[...], shift_ref[...]
        acc = jnp.zeros((rows, n), jnp.float32)
        for tap in range(TAPS):
            a = _tap_input(z_ref, p, row, col, tap, p < m, mul_, shift, h, width)
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
        kernel, z.reshape(m, k), mul, pw.shift_of(mean, mul, bias) if shift is None else shift,
        w.reshape(TAPS, k, n).astype(dt), interpret=interpret, num_warps=4, grid=grid,
        in_specs=[whole(m, k), whole(k), whole(k), whole(TAPS, k, n)], out_specs=out_specs,
        out_shape=out_shape, name="bn_relu_conv3x3")
    out = results[0][:m].reshape(b, h, width, n)
    if not stats:
        return out, None
    return out, results[1] if partials else pw.total_row_sums(results[1])


def partial_rows(m: int, k: int, n: int) -> int:
    """How many programs' shares of its output's sums the forward kernel writes for ``m``
    pixels, ``k`` input and ``n`` output channels (:func:`block_rows`)."""
    return -(-m // block_rows(k, n))


def backward_blocks(m: int, k: int, n: int) -> tuple[int, int, int]:
    """``(block_m, block_k, rows)`` of the backward kernel: ``block_k`` input channels a
    program computes (its nine taps' weight gradients, 9 x ``block_k`` x n, accumulate in
    at most about 36 KB of float32: 16 channels for PreResNet's), ``block_m`` rows a loop
    step (the gathered cotangent tile, ``block_m`` x n, within 1,024 values; larger steps
    spilled registers, ``experiments/kernel_registers.py``) and ``rows`` per program as
    ``pointwise.program_rows`` (at batch 128 the partial weight gradients are 2.4 MB in
    stage 1 against z's 8.4 MB, 4.7 MB in stage 3 against 2.1 MB). Untuned."""
    block_k = max(16, min(k, 2 ** int(math.log2(8192 // (TAPS * n)))))
    block_m = max(16, min(128, 1024 // n))
    return block_m, block_k, pw.program_rows(m, block_m, k // block_k)


@functools.partial(jax.jit, static_argnames=("with_dz", "with_dw", "interpret", "partials"))
def _pallas_backward(z, mean, mul, bias, w, d_out, out, d_sums, with_dz: bool,
                     with_dw: bool, interpret: bool, partials: bool = False, shift=None):
    """The derivative of :func:`reference` as one Pallas kernel: ``(d_z (B, H, W, K) in z's
    dtype or None without ``with_dz``, d_w (3, 3, K, N) float32 or None without
    ``with_dw``, (sum d_x, sum d_x * (z - mean)), each (K,) float32)``, ``d_x`` being the
    cotangent of bn2's affine map's output, from the output's cotangent ``d_out`` and the
    sums' ``d_sums = (d_sum, d_squares)`` (either None: zero; ``out``, the forward pass's
    output, is read for the sum of squares' part).

    Each program takes a block of pixels and of input channels and loops over its pixels
    in steps. A step forms the output's cotangent ``g`` (with the statistics' part,
    rounded to z's dtype, as ``pointwise.backward`` does) at the nine shifted rows that
    read its pixels (masked where that output pixel lies outside the image) and adds
    their products with the taps' transposed filters: ``d_x``, through the ReLU's mask
    recomputed from ``z``, times ``mul``, is ``d_z``. It also recomputes the activated
    input at the nine rows its own pixels read (zero outside the image, as the forward
    pass pads it) and adds each one's product with its own ``g`` to that tap's weight
    gradient. The programs' partial weight gradients and sums are added up here, in one
    reduction (with ``partials`` they are returned as they are, d_w (P, 3, 3, K, N) and the
    sums (P, 2, K), for ``bn_input.finish``; ``shift`` as :func:`_pallas`'s). No activated
    input, padded copy or full cotangent is written."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    b, h, width, k = z.shape
    n = w.shape[-1]
    m, dt, f32 = b * h * width, z.dtype, jnp.float32
    block_m, block_k, rows = backward_blocks(m, k, n)
    grid = (pl.cdiv(m, rows), k // block_k)
    d_sum, d_squares = d_sums
    given = [(name, v) for name, v in (("out", out if d_squares is not None else None),
                                        ("d_sum", d_sum), ("d_squares", d_squares))
             if v is not None]

    def kernel(z_ref, mean_ref, mul_ref, shift_ref, w_ref, g_ref, *refs):
        ins = pw.named_refs(refs, [*(name for name, _ in given),
                                   *pw.backward_outputs(with_dz, with_dw)])
        dz_ref, dw_ref, sums_ref = (ins.get(k) for k in ("dz", "dw", "sums"))
        mean_, mul_, shift = mean_ref[...], mul_ref[...], shift_ref[...]
        base = pl.program_id(0) * rows  # (program ids are read here, outside the loop)

        def step(j, carry):
            p = base + j * block_m + jnp.arange(block_m)  # this step's pixels
            col, row = p % width, (p // width) % h
            valid = p < m
            own = jnp.clip(p, 0, m - 1)
            d_sums_ = tuple(ins[name][...] if name in ins else None
                            for name in ("d_sum", "d_squares"))

            def cotangent(source, keep):
                """The output's cotangent at rows ``source`` with the statistics' part,
                zero where not ``keep``, in z's dtype."""
                o = ins["out"][source, :] if "out" in ins else None
                g = pw.with_statistics(g_ref[source, :].astype(f32), o, *d_sums_)
                return jnp.where(keep[:, None], g, 0.0).astype(dt)

            z_own = z_ref[own, :]
            a_own = pw.bn_relu_shifted(z_own, mul_, shift)
            g_own = cotangent(own, valid)
            d_x = jnp.zeros((block_m, block_k), f32)
            d_w = list(carry[2:])
            for tap in range(TAPS):
                dy, dx = divmod(tap, 3)
                offset = (dy - 1) * width + dx - 1
                if offset == 0:  # the centre tap: the pixel's own cotangent and input
                    g, a = g_own, jnp.where(valid[:, None], a_own, jnp.zeros((), dt))
                else:  # the output pixel that reads this pixel at this tap, p - offset,
                    # and the input this pixel reads at it, p + offset
                    reads = valid & _inside(row - dy + 1, col - dx + 1, h, width)
                    g = cotangent(jnp.clip(p - offset, 0, m - 1), reads)
                    a = (_tap_input(z_ref, p, row, col, tap, valid, mul_, shift, h, width)
                         if with_dw else None)
                d_x += jax.lax.dot_general(g, w_ref[tap], (((1,), (1,)), ((), ())),
                                           preferred_element_type=f32)
                if with_dw:
                    d_w[tap] += jax.lax.dot_general(a, g_own, (((0,), (0,)), ((), ())),
                                                    preferred_element_type=f32)
            d_x = jnp.where(a_own > 0, d_x, 0.0)
            if with_dz:
                dz_ref[pl.ds(j * block_m, block_m), :] = (d_x * mul_).astype(dt)
            return (carry[0] + jnp.sum(d_x, axis=0),
                    carry[1] + jnp.sum(d_x * (z_own.astype(f32) - mean_), axis=0), *d_w)

        zeros = jnp.zeros((block_k,), f32)
        init = (zeros, zeros, *([jnp.zeros((block_k, n), f32)] * TAPS if with_dw else []))
        carry = jax.lax.fori_loop(0, rows // block_m, step, init)
        sums_ref[0, :] = carry[0]
        sums_ref[1, :] = carry[1]
        for tap in range(TAPS if with_dw else 0):
            dw_ref[tap, :, :] = carry[2 + tap]

    vector = pl.BlockSpec((block_k,), lambda i, j: (j,))
    whole_n = pl.BlockSpec((m, n), lambda i, j: (0, 0))
    spec = {"out": whole_n, "d_sum": pl.BlockSpec((n,), lambda i, j: (0,))}
    spec["d_squares"] = spec["d_sum"]
    in_specs = [pl.BlockSpec((m, block_k), lambda i, j: (0, j)), vector, vector, vector,
                pl.BlockSpec((TAPS, block_k, n), lambda i, j: (0, j, 0)), whole_n,
                *(spec[name] for name, _ in given)]
    args = [z.reshape(m, k), mean, mul, pw.shift_of(mean, mul, bias) if shift is None else shift,
            w.reshape(TAPS, k, n).astype(dt), d_out.reshape(m, n).astype(dt),
            *(v.reshape(m, n) if name == "out" else v for name, v in given)]
    out_specs, out_shape = [], []
    if with_dz:
        out_specs.append(pl.BlockSpec((rows, block_k), lambda i, j: (i, j)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0] * rows, k), dt))
    if with_dw:
        out_specs.append(pl.BlockSpec((None, TAPS, block_k, n), lambda i, j: (i, 0, j, 0)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0], TAPS, k, n), f32))
    out_specs.append(pl.BlockSpec((None, 2, block_k), lambda i, j: (i, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((grid[0], 2, k), f32))
    results = list(kernel_impl.pallas_call(
        kernel, *args, interpret=interpret, num_warps=8, num_stages=1, grid=grid,
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        name="bn_relu_conv3x3_backward"))
    dz = results.pop(0)[:m].reshape(b, h, width, k) if with_dz else None
    if partials:
        return dz, results[0].reshape(-1, 3, 3, k, n) if with_dw else None, results[-1]
    d_w, sums = pw.total_partials(results[-1], results[0] if with_dw else None)
    return dz, None if d_w is None else d_w.reshape(3, 3, k, n), sums


#: The operands of the kernel's derivative, in order.
OPERANDS = ("z", "mean", "mul", "bias", "w")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel(z, mean, mul, bias, w, stats, interpret):
    return _pallas(z, mean, mul, bias, w, stats, interpret)


def _kernel_fwd(z, mean, mul, bias, w, stats, interpret):
    """With symbolic zeros (``pointwise._kernel_fwd``): the perturbed operands' names travel
    to the backward pass."""
    primals = (z, mean, mul, bias, w)
    values = [p.value for p in primals]
    out, sums = _pallas(*values, stats, interpret)
    return (out, sums), (*values, out if stats else None, pw.perturbed(OPERANDS, primals))


def _kernel_bwd(stats, interpret, saved, cotangents):
    """The backward kernel (:func:`_pallas_backward`); no z or w cotangent is computed that
    is not wanted."""
    z, mean, mul, bias, w, out, wanted = saved
    d_out, d_sums = cotangents
    d_z, d_w, sums = _pallas_backward(
        z, mean, mul, bias, w, dense(d_out), out, sums_or_none(d_sums), "z" in wanted,
        "w" in wanted, interpret)
    result = (d_z, *pw.affine_cotangents(mean, mul, bias, sums),
              None if d_w is None else d_w.astype(w.dtype))
    return tuple(c if name in wanted else None for name, c in zip(OPERANDS, result,
                                                                   strict=True))


_kernel.defvjp(_kernel_fwd, _kernel_bwd, symbolic_zeros=True)


class _FromSums:
    """The kernel as ``bn_input.apply``'s ``op``; ``flags``: ``(stats, interpret, shares)``,
    as ``pointwise``'s."""

    names = ("w",)

    @staticmethod
    def forward(flags, z, mean, mul, bias, w, shift=None):
        stats, interpret, shares = flags
        out, sums = _pallas(z, mean, mul, bias, w, stats, interpret, shift, shares)
        if sums is not None and shares:
            sums = bn_input.shares_of(sums)
        return (out, sums), (z, mean, mul, bias, w, out if stats else None, shift)

    @staticmethod
    def backward(flags, residuals, cotangents, wanted):
        d_out, d_sums = cotangents
        d_z, d_w, sums = _pallas_backward(
            *residuals[:5], dense(d_out), residuals[5], sums_or_none(d_sums),
            "z" in wanted, "w" in wanted, flags[1], partials=True, shift=residuals[6])
        return d_z, (None,), sums, d_w


def bn_relu_conv3x3_from_sums(z, sums, scale, bias, w, *, epsilon: float,
                              stats: bool = False, shares: bool = False, impl: str = "auto"):
    """:func:`bn_relu_conv3x3` with its BatchNorm in train mode, given as ``sums`` (z's
    channels' sum and sum of squares over all its pixels, float32), ``scale``, ``bias``
    (K,) and ``epsilon``, as ``pointwise.bn_relu_matmul_from_sums``: returns ``(out, (mean,
    var), out's sums or None)``; with the kernels, the BatchNorm's derivative beside the
    backward kernel's partial sums in one kernel (``bn_input.apply``); without them (and in
    a data-parallel program), composed. ``sums`` and ``shares`` as that op's."""
    kernel_impl.check("bn_relu_conv3x3_from_sums", impl)
    _check(z, sums[0], sums[1], bias, w)  # the sums (or Sums' zeros), bias (K,)
    pw.check_scale("bn_relu_conv3x3_from_sums", scale, bias)
    shares = shares and stats

    def plain(*operands, impl):
        return bn_relu_conv3x3(*operands, stats=stats, impl=impl)

    composed = (impl == "xla" or (impl == "auto" and not kernel_fits(*w.shape[2:]))
                or bool(pw.row_axes(z.shape[0])))
    rows = partial_rows(z.size // z.shape[-1], *w.shape[2:]) if shares else None
    return bn_input.from_sums(_FromSums, (stats, impl == "interpret", shares), epsilon, plain,
                              impl, composed, rows, z, sums, scale, bias, w)


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
