"""A 1x1 convolution with the BatchNorm + ReLU before it and the statistics after it, as one
GPU kernel (Pallas, Triton backend).

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
BatchNorm's statistics) from the same pass. The sweep's train-mode pass and evaluation are
forward only, bound by memory traffic; see docs/benchmarks.md, "A fused kernel for the 1x1
convolutions".

``impl`` picks how it runs: ``"auto"`` the kernel where the program is compiled for an
NVIDIA GPU (a card, or a deviceless compilation for one; for the channel counts it takes,
:func:`kernel_fits`) and the plain computation elsewhere (``jax.lax.platform_dependent``:
the choice follows the platform the program is lowered for, not the default backend);
``"pallas"`` the kernel; ``"interpret"`` the kernel interpreted by Pallas on any backend
(tests); ``"xla"`` the same computation in plain jax.numpy (:func:`reference`). Every impl
returns the same values up to float rounding. The kernel has no derivative of its own: its
backward pass is that of the plain computation (``jax.vjp`` of :func:`reference`, which
recomputes the forward), so models that use it still train, only without the kernel's
saving in the backward pass.

Block sizes are fixed by a rule (:func:`blocks`), not tuned on a card: no GPU has timed
this kernel yet.
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
        out_ref, *sum_refs = refs
        a = bn_relu(z_ref[...], mean_ref[...], mul_ref[...], bias_ref[...])
        c = jnp.dot(a, w_ref[...], preferred_element_type=jnp.float32)
        out = _epilogue(c, None if ob_ref is None else ob_ref[...],
                        None if r_ref is None else r_ref[...], out_relu, dt)
        out_ref[...] = out
        if sum_refs:
            o = out.astype(jnp.float32)
            if pad:  # the padding rows past m are left out of the sums
                rows = pl.program_id(0) * block_m + jnp.arange(block_m)
                o = jnp.where((rows < m)[:, None], o, 0.0)
            sum_refs[0][...] = jnp.sum(o, axis=0)
            sum_refs[1][...] = jnp.sum(o * o, axis=0)

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
    if stats:  # one row of partial sums per block of rows, added up below
        partial = pl.BlockSpec((None, block_n), lambda i, j: (i, j))
        out_specs += [partial, partial]
        out_shape += [jax.ShapeDtypeStruct((grid[0], n), jnp.float32)] * 2
    results = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4,
                                                                        num_stages=2),
        interpret=interpret, name="bn_relu_matmul")(*args)
    out = results[0][:m] if pad else results[0]
    if not stats:
        return out, None
    return out, (jnp.sum(results[1], 0), jnp.sum(results[2], 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _kernel(z, mean, mul, bias, w, residual, out_bias, stats, out_relu, interpret):
    return _pallas(z, mean, mul, bias, w, residual, out_bias, stats, out_relu, interpret)


def _kernel_fwd(*args):
    return _kernel(*args), args[:7]


def _kernel_bwd(stats, out_relu, interpret, primals, cotangents):
    _, vjp = jax.vjp(functools.partial(reference, stats=stats, out_relu=out_relu), *primals)
    return vjp(cotangents)


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
