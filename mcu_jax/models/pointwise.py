"""A 1x1 convolution with the BatchNorm + ReLU before it and the statistics after it, as one
GPU kernel (Pallas, Triton backend), and its derivative as a second one.

In PreResNet-110's bottleneck blocks two of three convolutions are 1x1, and they read and
write the block's widest activations. Run as XLA composes them, each is several passes over
memory: the BatchNorm's normalise + ReLU reads its input and writes the activated copy, the
convolution reads that and writes its output, the residual add reads two tensors and writes
a third, and the next BatchNorm's statistics read the result again. Here one kernel reads
the raw input ``z`` (M, K) once, normalises and activates it in registers
(``relu((z - mean) * mul + bias)``, Flax's order of operations), multiplies by ``w`` (K, N),
adds an optional ``out_bias`` (N,) and ``residual`` (M, N), applies an optional ReLU (a
following BatchNorm folded in: ``out_bias``, ``out_relu``), writes the output once and, in
train mode, returns the per-channel sums of the output and of its square (the next
BatchNorm's statistics) from the same pass. See docs/benchmarks.md, "A fused kernel for the
1x1 convolutions".

The derivative is written out (:func:`backward`): the output's cotangent, with the
statistics' part added (which needs the output: the forward pass keeps it rather than
recomputing the product, as autodiff of the plain computation would), goes to a backward
kernel (:func:`_pallas_backward`) that reads it and ``z`` once per block of input channels,
recomputes the activated input in registers and writes ``z``'s cotangent, with partial sums
of the weight gradient and of the BatchNorm's parameter gradients. So a training step with
the kernels moves fewer bytes in fewer kernels than one without them (docs/benchmarks.md,
"The fused 1x1 kernel in training").

``impl`` picks how it runs: ``"auto"`` the kernels where the program is compiled for an
NVIDIA GPU (a card, or a deviceless compilation for one; for the channel counts they take,
:func:`kernel_fits`) and the plain computation elsewhere (``jax.lax.platform_dependent``:
the choice follows the platform the program is lowered for, not the default backend);
``"pallas"`` the kernels; ``"interpret"`` the kernels interpreted by Pallas on any backend
(tests); ``"xla"`` the same computation in plain jax.numpy (:func:`reference`,
differentiated by autodiff). Every impl returns the same values and derivatives up to float
rounding.

Block sizes are fixed by rules (:func:`blocks`, :func:`backward_blocks`), not tuned on a
card: no GPU has timed these kernels yet. The kernels have no rule for XLA's SPMD
partitioner: where a program splits the batch over several devices, XLA gathers the rows
before each kernel and runs it whole on every device (the same results, without the
speed-up; docs/benchmarks.md, "Multiple devices").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mcu_jax.models.batchnorm import affine

IMPLS = ("auto", "pallas", "interpret", "xla")


def blocks(k: int, n: int) -> tuple[int, int]:
    """``(block_m, block_n)``: rows and output channels a kernel instance computes: 128 rows,
    fewer where ``k`` is over 64 so that the input tile stays at 32 KB of float32 (down to 16
    rows), and at most 64 output channels. Untuned."""
    return max(16, min(128, 8192 // k)), min(n, 64)


def bn_relu(z, mean, mul, bias):
    """``relu((z - mean) * mul + bias)``, the affine map in float32 and cast to z's dtype
    before the ReLU (as ``nn.relu(nn.BatchNorm(...)(z))``)."""
    return jax.nn.relu(affine(z, mean, mul, bias).astype(z.dtype))


def kernel_fits(k: int, n: int) -> bool:
    """Whether the Pallas kernel takes ``k`` input and ``n`` output channels: powers of two,
    at least 16 (Triton's tiles and products); "auto" runs the plain computation otherwise."""
    return all(v >= 16 and v & (v - 1) == 0 for v in (k, n))


def _check(z, mean, mul, bias, w, residual, out_bias=None) -> tuple[int, int, int]:
    m, k = z.shape
    if w.shape[0] != k or any(v.shape != (k,) for v in (mean, mul, bias)):
        raise ValueError(f"bn_relu_matmul: z {z.shape} needs w ({k}, N) and mean, mul, bias "
                         f"({k},); got w {w.shape}, mean {mean.shape}, mul {mul.shape}, "
                         f"bias {bias.shape}")
    n = w.shape[1]
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"bn_relu_matmul: residual must be ({m}, {n}), got {residual.shape}")
    if out_bias is not None and out_bias.shape != (n,):
        raise ValueError(f"bn_relu_matmul: out_bias must be ({n},), got {out_bias.shape}")
    return m, k, n


def _epilogue(c, out_bias, residual, out_relu: bool, dt):
    """The float32 product ``c`` plus ``out_bias`` and ``residual`` (either may be None), cast
    to ``dt``, then the ReLU if ``out_relu``."""
    if out_bias is not None:
        c = c + out_bias
    if residual is not None:
        c = c + residual.astype(jnp.float32)
    out = c.astype(dt)
    return jax.nn.relu(out) if out_relu else out


def reference(z, mean, mul, bias, w, residual=None, out_bias=None, stats: bool = False,
              out_relu: bool = False):
    """The computation in jax.numpy: ``(out (M, N) in z's dtype, (sum, sum of squares) of
    out's channels in float32 or None)``; see :func:`bn_relu_matmul`."""
    _check(z, mean, mul, bias, w, residual, out_bias)
    dt = z.dtype
    c = jnp.dot(bn_relu(z, mean, mul, bias), w.astype(dt), preferred_element_type=jnp.float32)
    out = _epilogue(c, out_bias, residual, out_relu, dt)
    if not stats:
        return out, None
    o = out.astype(jnp.float32)
    return out, (jnp.sum(o, 0), jnp.sum(o * o, 0))


def _pallas(z, mean, mul, bias, w, residual, out_bias, stats: bool, out_relu: bool,
            interpret: bool):
    """The Pallas kernel; arguments and results as :func:`reference`."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only
    from jax.experimental.pallas import triton as pltriton

    m, k, n = _check(z, mean, mul, bias, w, residual, out_bias)
    if not kernel_fits(k, n):
        raise ValueError(f"bn_relu_matmul: the Pallas kernel needs K and N powers of two, at "
                         f"least 16; got K={k}, N={n} (impl='xla' takes any)")
    dt = z.dtype
    block_m, block_n = blocks(k, n)
    grid = (pl.cdiv(m, block_m), n // block_n)
    pad = grid[0] * block_m - m
    if pad:  # Triton's block loads and stores are not bounded: whole blocks of rows only
        z = jnp.pad(z, ((0, pad), (0, 0)))
        residual = None if residual is None else jnp.pad(residual, ((0, pad), (0, 0)))

    def kernel(z_ref, mean_ref, mul_ref, bias_ref, w_ref, *refs):
        refs = list(refs)  # the optional inputs, then the outputs
        ob_ref = refs.pop(0) if out_bias is not None else None
        r_ref = refs.pop(0) if residual is not None else None
        out_ref, *sums_ref = refs
        a = bn_relu(z_ref[...], mean_ref[...], mul_ref[...], bias_ref[...])
        c = jnp.dot(a, w_ref[...], preferred_element_type=jnp.float32)
        out = _epilogue(c, None if ob_ref is None else ob_ref[...],
                        None if r_ref is None else r_ref[...], out_relu, dt)
        out_ref[...] = out
        if sums_ref:
            o = out.astype(jnp.float32)
            if pad:  # the padding rows past m are left out of the sums
                rows = pl.program_id(0) * block_m + jnp.arange(block_m)
                o = jnp.where((rows < m)[:, None], o, 0.0)
            sums_ref[0][0, :] = jnp.sum(o, axis=0)
            sums_ref[0][1, :] = jnp.sum(o * o, axis=0)

    vector = pl.BlockSpec((k,), lambda i, j: (0,))
    tile = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
    in_specs = [pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), vector, vector, vector,
                pl.BlockSpec((k, block_n), lambda i, j: (0, j))]
    args = [z, mean, mul, bias, w.astype(dt)]
    if out_bias is not None:
        in_specs.append(pl.BlockSpec((block_n,), lambda i, j: (j,)))
        args.append(out_bias)
    if residual is not None:
        in_specs.append(tile)
        args.append(residual)
    out_specs, out_shape = [tile], [jax.ShapeDtypeStruct((m + pad, n), dt)]
    if stats:  # partial sums for each block of rows, added up below in one reduction
        out_specs.append(pl.BlockSpec((None, 2, block_n), lambda i, j: (i, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0], 2, n), jnp.float32))
    results = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4,
                                                                        num_stages=2),
        interpret=interpret, name="bn_relu_matmul")(*args)
    out = results[0][:m] if pad else results[0]
    if not stats:
        return out, None
    sums = jnp.sum(results[1], 0)
    return out, (sums[0], sums[1])


def backward_blocks(m: int, k: int, n: int) -> tuple[int, int, int]:
    """``(block_m, block_k, rows)`` of the backward kernel: ``block_k`` input channels a
    program computes (its weight gradient, ``block_k`` x n, accumulates in at most 32 KB of
    float32), ``block_m`` rows a loop step (the gradient's tile at most 32 KB), and ``rows``
    per program, a power-of-two multiple of ``block_m`` chosen so that about 256 programs
    share the rows and channels. Untuned."""
    block_k = max(16, min(k, 8192 // n))
    block_m = max(16, min(128, 8192 // max(n, block_k)))
    chunks = max(1, 256 // (k // block_k))
    rows = block_m
    while rows * chunks < m:
        rows *= 2
    return block_m, block_k, rows


def _pallas_backward(z, mean, mul, bias, w, gd, interpret: bool):
    """The derivative of the kernel's product and its BatchNorm + ReLU as one Pallas kernel:
    from ``gd`` (M, N), the output's cotangent in z's dtype, ``(d_z (M, K) in z's dtype,
    d_x's sums: (sum d_x, sum d_x * (z - mean)) (2, K) float32, d_w (K, N) float32)``, where
    ``d_x`` is the cotangent of the affine map's output. Each program reads its rows of ``z``
    and ``gd`` once, recomputes the activated input in registers, and returns partial sums of
    the weight gradient and of d_x's sums for its rows, added up here."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only
    from jax.experimental.pallas import triton as pltriton

    m, k = z.shape
    n = w.shape[1]
    dt = z.dtype
    block_m, block_k, rows = backward_blocks(m, k, n)
    grid = (pl.cdiv(m, rows), k // block_k)
    pad = grid[0] * rows - m
    if pad:  # zero cotangent rows add nothing to any sum
        z, gd = jnp.pad(z, ((0, pad), (0, 0))), jnp.pad(gd, ((0, pad), (0, 0)))

    def kernel(z_ref, mean_ref, mul_ref, bias_ref, w_ref, g_ref, dz_ref, sums_ref, dw_ref):
        mean, mul, bias, w_t = mean_ref[...], mul_ref[...], bias_ref[...], w_ref[...]

        def step(j, carry):
            d_w, s_x, s_xz = carry
            here = pl.ds(j * block_m, block_m)
            zj, gj = z_ref[here, :], g_ref[here, :]
            a = bn_relu(zj, mean, mul, bias)
            d_a = jnp.dot(gj, w_t.T, preferred_element_type=jnp.float32)
            d_x = jnp.where(a > 0, d_a, 0.0)
            dz_ref[here, :] = (d_x * mul).astype(dt)
            d_w = d_w + jnp.dot(a.T, gj, preferred_element_type=jnp.float32)
            return (d_w, s_x + jnp.sum(d_x, axis=0),
                    s_xz + jnp.sum(d_x * (zj.astype(jnp.float32) - mean), axis=0))

        zeros = jnp.zeros((block_k,), jnp.float32)
        d_w, s_x, s_xz = jax.lax.fori_loop(
            0, rows // block_m, step, (jnp.zeros((block_k, n), jnp.float32), zeros, zeros))
        dw_ref[...] = d_w
        sums_ref[0, :] = s_x
        sums_ref[1, :] = s_xz

    vector = pl.BlockSpec((block_k,), lambda i, j: (j,))
    results = pl.pallas_call(
        kernel, grid=grid,
        in_specs=[pl.BlockSpec((rows, block_k), lambda i, j: (i, j)), vector, vector, vector,
                  pl.BlockSpec((block_k, n), lambda i, j: (j, 0)),
                  pl.BlockSpec((rows, n), lambda i, j: (i, 0))],
        out_specs=[pl.BlockSpec((rows, block_k), lambda i, j: (i, j)),
                   pl.BlockSpec((None, 2, block_k), lambda i, j: (i, 0, j)),
                   pl.BlockSpec((None, block_k, n), lambda i, j: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((m + pad, k), dt),
                   jax.ShapeDtypeStruct((grid[0], 2, k), jnp.float32),
                   jax.ShapeDtypeStruct((grid[0], k, n), jnp.float32)],
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4,
                                                                        num_stages=2),
        interpret=interpret, name="bn_relu_matmul_backward")(z, mean, mul, bias,
                                                              w.astype(dt), gd)
    dz = results[0][:m] if pad else results[0]
    return dz, jnp.sum(results[1], 0), jnp.sum(results[2], 0)


def backward(z, mean, mul, bias, w, residual, out_bias, out, cotangents, stats: bool,
             out_relu: bool, kernel: bool | None = None):
    """The derivative of :func:`reference`, written out: the cotangents of ``(z, mean, mul,
    bias, w, residual, out_bias)`` from those of ``(out, sums)``, given the forward pass's
    ``out``. Unlike autodiff of the plain computation it does not recompute the product
    ``out`` (the statistics' derivative needs it). ``kernel``: None for XLA ops, else the
    backward Pallas kernel (interpreted if True), which recomputes the activated input in
    registers instead of in memory."""
    dt, f32 = z.dtype, jnp.float32
    d_out, d_sums = cotangents
    g = d_out.astype(f32)
    if stats:  # d(sum o)/do = 1, d(sum o^2)/do = 2 o
        g = g + d_sums[0] + 2.0 * out.astype(f32) * d_sums[1]
    if out_relu:
        g = jnp.where(out > 0, g, 0.0)
    gd = g.astype(dt)
    if kernel is not None:
        d_z, (d_bias, d_mul), d_w = _pallas_backward(z, mean, mul, bias, w, gd, kernel)
    else:
        a = bn_relu(z, mean, mul, bias)
        d_w = jnp.dot(a.T, gd, preferred_element_type=f32)
        d_x = jnp.where(a > 0, jnp.dot(gd, w.astype(dt).T, preferred_element_type=f32), 0.0)
        d_z = (d_x * mul).astype(dt)  # through the ReLU and the cast, then the affine map
        d_bias, d_mul = jnp.sum(d_x, 0), jnp.sum(d_x * (z.astype(f32) - mean), 0)
    return (d_z, -mul * d_bias, d_mul, d_bias, d_w.astype(w.dtype),
            None if residual is None else g.astype(residual.dtype),
            None if out_bias is None else jnp.sum(g, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _kernel(z, mean, mul, bias, w, residual, out_bias, stats, out_relu, interpret):
    return _pallas(z, mean, mul, bias, w, residual, out_bias, stats, out_relu, interpret)


def _kernel_fwd(*args):
    results = _kernel(*args)
    return results, (*args[:7], results[0])


def _kernel_bwd(stats, out_relu, interpret, saved, cotangents):
    return backward(*saved, cotangents, stats, out_relu, kernel=interpret)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def bn_relu_matmul(z, mean, mul, bias, w, residual=None, *, out_bias=None,
                   out_relu: bool = False, stats: bool = False, impl: str = "auto"):
    """``relu((z - mean) * mul + bias) @ w (+ out_bias) (+ residual)``, then a ReLU if
    ``out_relu``, over the last axis of ``z`` (any leading axes: an NHWC activation is a 1x1
    convolution's input), and with ``stats`` the output channels' ``(sum, sum of squares)``
    in float32 (else None). ``mean``, ``mul``, ``bias``: (K,) float32 (a BatchNorm's
    statistics and ``scale / sqrt(var + eps)``); ``w``: (K, N); ``out_bias``: (N,) float32
    (e.g. the next BatchNorm folded in, with ``out_relu``); ``residual``: the output's shape.
    ``impl``: one of :data:`IMPLS` (module docstring). ValueError for shapes that do not fit.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: got {impl!r}, expected one of {IMPLS}")
    lead = z.shape[:-1]
    if residual is not None and residual.shape != (*lead, w.shape[-1]):
        raise ValueError(f"bn_relu_matmul: residual must be {(*lead, w.shape[-1])} (z "
                         f"{z.shape} times w {w.shape}), got {residual.shape}")
    flat = z.reshape(-1, z.shape[-1])
    res = None if residual is None else residual.reshape(flat.shape[0], -1)

    def plain(*args):
        return reference(*args, stats=stats, out_relu=out_relu)

    def kernel(*args, interpret=impl == "interpret"):
        return _kernel(*args, stats, out_relu, interpret)

    args = (flat, mean, mul, bias, w, res, out_bias)
    if impl == "auto" and kernel_fits(*w.shape):
        out, sums = jax.lax.platform_dependent(*args, cuda=kernel, default=plain)
    else:
        out, sums = plain(*args) if impl in ("xla", "auto") else kernel(*args)
    return out.reshape(*lead, w.shape[-1]), sums
