"""A 1x1 convolution with the BatchNorm + ReLU before it and the statistics after it, as one
GPU kernel (Pallas, Triton backend), and its derivative as a second one.

In PreResNet-110's bottleneck blocks two of three convolutions are 1x1, and they read and
write the block's widest activations. Run as XLA composes them, each is several passes over
memory: the BatchNorm's normalise + ReLU reads its input and writes the activated copy, the
convolution reads that and writes its output, the residual add reads two tensors and writes
a third, and the next BatchNorm's statistics read the result again. Here one kernel reads
the raw input ``z`` (M, K) once, normalises and activates it in registers (as
``relu(z * mul + shift)``, ``shift = bias - mean * mul``: Flax's ``relu((z - mean) * mul +
bias)`` up to float rounding, with the offset folded into ``shift`` by XLA beside ``mul``,
so that the BatchNorm offset reaches the kernel inside that kernel's output rather than as
an operand of its own, which costs a copy kernel where the offset is a slice of a packed
vector, as in curve training), multiplies by ``w`` (K, N),
adds an optional ``out_bias`` (N,) and ``residual`` (M, N), applies an optional ReLU (a
following BatchNorm folded in: ``out_bias``, ``out_relu``), writes the output once and, in
train mode, returns the per-channel sums of the output and of its square (the next
BatchNorm's statistics) from the same pass. See docs/benchmarks.md, "A fused kernel for the
1x1 convolutions".

The derivative is written out (:func:`backward`): a backward kernel
(:func:`_pallas_backward`) reads the output's cotangent and ``z`` once per block of input
channels, adds the statistics' part to the cotangent as it reads it (which needs the
output: the forward pass keeps it rather than recomputing the product, as autodiff of the
plain computation would) and writes that sum once (the residual's cotangent), recomputes
the activated input in registers and writes ``z``'s cotangent, with partial sums of the
weight gradient and of the BatchNorm's parameter gradients. ``return_input`` returns ``z``
for a residual block's shortcut to read, so that the shortcut's cotangent reaches the
backward kernel, which adds it to ``z``'s as it writes it: XLA would otherwise add a
block's two output cotangents and the statistics' part in a pass of its own. And
:func:`bn_relu_matmul_bn` is the kernel followed by the next BatchNorm + ReLU in train mode,
whose derivative the backward kernel applies to its output's cotangent as it reads it,
after one XLA reduction for the BatchNorm's gradients; :func:`bn_relu_matmul_from_sums` is
the kernel with its own BatchNorm given as its input's sums (or the previous kernel's
programs' shares of them), scale and bias, whose coefficients are formed in one kernel and
whose derivative beside the backward kernel's partial sums in one more (``bn_input``). So
a training step with the kernels
moves fewer bytes in fewer kernels than one without them (docs/benchmarks.md, "The fused
1x1 kernel in training", "Fewer passes: a block's output cotangent summed in the backward
kernel", "Fewer passes: the BatchNorm after the kernel in the backward kernel" and "Fewer
kernels: each BatchNorm's coefficients and derivative in one kernel").

``impl`` (``kernel_impl``) picks how it runs: ``"auto"`` the kernels where the program is
compiled for an NVIDIA GPU (a card, or a deviceless compilation for one; for the channel
counts they take, :func:`kernel_fits`) and the plain computation elsewhere
(``kernel_impl.dispatch``: picked while tracing where JAX's default device is an NVIDIA
GPU, else by the platform the program is lowered for; on an NVIDIA GPU's host, a program
to lower for its CPU is traced under ``jax.default_device`` of a CPU device);
``"pallas"`` the kernels; ``"interpret"`` the kernels interpreted by Pallas on any backend
(tests); ``"xla"`` the same computation in plain jax.numpy (:func:`reference`,
differentiated by autodiff). Every impl returns the same values and derivatives up to float
rounding.

Block sizes are fixed by rules (:func:`blocks`, :func:`backward_blocks`) under which no
kernel spills registers (``experiments/kernel_registers.py``: ptxas for the H100, without
the card), not tuned for speed: no GPU has timed these kernels yet. XLA's SPMD partitioner
cannot split a custom kernel (it would gather the rows and run the kernel whole on every
device), so in a data-parallel program, which traces under its mesh
(``sharding.data_parallel``), each device runs the kernels on its own rows
(:func:`on_own_rows`); docs/benchmarks.md, "Multiple devices". The kernels are jitted
functions (their flags static), so that a model's calls of one shape share one trace and
one lowering instead of one a call (PreResNet-110 calls the forward kernel 72 times).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mcu_jax import kernel_impl
from mcu_jax.kernel_impl import dense, or_none, sums_or_none
from mcu_jax.models import bn_input
from mcu_jax.models.batchnorm import (
    affine,
    batch_coefficients,
    channel_sums_side_by_side,
)

IMPLS = kernel_impl.IMPLS


def blocks(k: int, n: int) -> tuple[int, int]:
    """``(block_m, block_n)``: rows and output channels a kernel instance computes: at most
    128 rows and 64 output channels, with the input tile (``block_m`` x k) and the weight tile
    (k x ``block_n``) within 8,192 values each, and the input tile smaller still for wide
    inputs (``block_m <= 2**20 / k**2``: 16 rows for K = 256), so that no tile spills
    registers (``experiments/kernel_registers.py``: ptxas for the H100 on every PreResNet-110
    shape). Untuned for speed."""
    return max(16, min(128, 8192 // k, 2 ** 20 // k ** 2)), min(n, 64, 8192 // k)


def bn_relu(z, mean, mul, bias):
    """``relu((z - mean) * mul + bias)``, the affine map in float32 and cast to z's dtype
    before the ReLU (as ``nn.relu(nn.BatchNorm(...)(z))``)."""
    return jax.nn.relu(affine(z, mean, mul, bias).astype(z.dtype))


def identity(channels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``(mean, mul, bias)`` of an identity BatchNorm map: for a kernel whose input is
    normalised and activated already (its ReLU then changes nothing)."""
    return jnp.zeros(channels), jnp.ones(channels), jnp.zeros(channels)


def shift_of(mean, mul, bias):
    """``bias - mean * mul``: the affine map as ``x * mul + shift``, the form the kernels apply
    (one operand fewer than ``(mean, mul, bias)``, and computed by XLA beside ``mul``)."""
    return bias - mean * mul


def bn_relu_shifted(z, mul, shift):
    """``relu(z * mul + shift)``, the affine map in float32 and cast to z's dtype before the
    ReLU: :func:`bn_relu` up to float rounding."""
    return jax.nn.relu((z.astype(jnp.float32) * mul + shift).astype(z.dtype))


def kernel_fits(k: int, n: int) -> bool:
    """Whether the Pallas kernels take ``k`` input and ``n`` output channels: powers of two
    from 16 (Triton's tiles and products) to 512 (the tiles of :func:`blocks` and
    :func:`backward_blocks` stay within 32 KB of float32); "auto" runs the plain computation
    otherwise."""
    return all(16 <= v <= 512 and v & (v - 1) == 0 for v in (k, n))


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


def epilogue(c, out_bias, residual, out_relu: bool, dt):
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
    out = epilogue(c, out_bias, residual, out_relu, dt)
    if not stats:
        return out, None
    o = out.astype(jnp.float32)
    return out, (jnp.sum(o, 0), jnp.sum(o * o, 0))


def pad_rows(pad: int, *arrays):
    """``arrays`` (None stays None) with ``pad`` rows of zeros appended: Triton's block loads
    and stores are not bounded, so the kernels take whole blocks of rows only."""
    if not pad:
        return arrays
    return tuple(None if a is None else jnp.pad(a, ((0, pad), (0, 0))) for a in arrays)


@functools.partial(jax.jit, static_argnames=("stats", "out_relu", "interpret", "partials"))
def _pallas(z, mean, mul, bias, w, residual, out_bias, stats: bool, out_relu: bool,
            interpret: bool, shift=None, partials: bool = False):
    """The Pallas kernel; arguments and results as :func:`reference`, but ``shift``: the
    affine map's offset as the kernel applies it (:func:`shift_of`, formed here if None)
    and, with ``partials``, the sums as the programs' shares (P, 2, N), not added up
    (:func:`partial_rows` rows)."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    m, k, n = _check(z, mean, mul, bias, w, residual, out_bias)
    if not kernel_fits(k, n):
        raise ValueError(f"bn_relu_matmul: the Pallas kernel needs K and N powers of two "
                         f"from 16 to 512; got K={k}, N={n} (impl='xla' takes any)")
    dt = z.dtype
    block_m, block_n = blocks(k, n)
    grid = (partial_rows(m, k, n), n // block_n)
    pad = grid[0] * block_m - m
    z, residual = pad_rows(pad, z, residual)

    def kernel(z_ref, mul_ref, shift_ref, w_ref, *refs):
        refs = list(refs)  # the optional inputs, then the outputs
        ob_ref = refs.pop(0) if out_bias is not None else None
        r_ref = refs.pop(0) if residual is not None else None
        out_ref, *sums_ref = refs
        a = bn_relu_shifted(z_ref[...], mul_ref[...], shift_ref[...])
        c = jnp.dot(a, w_ref[...], preferred_element_type=jnp.float32)
        out = epilogue(c, None if ob_ref is None else ob_ref[...],
                       None if r_ref is None else r_ref[...], out_relu, dt)
        out_ref[...] = out
        if sums_ref:  # the padding rows past m are left out of the sums
            valid = (pl.program_id(0) * block_m + jnp.arange(block_m) < m) if pad else None
            write_row_sums(sums_ref[0], out, valid)

    vector = pl.BlockSpec((k,), lambda i, j: (0,))
    tile = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
    in_specs = [pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), vector, vector,
                pl.BlockSpec((k, block_n), lambda i, j: (0, j))]
    args = [z, mul, shift_of(mean, mul, bias) if shift is None else shift, w.astype(dt)]
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
    results = kernel_impl.pallas_call(kernel, *args, interpret=interpret, num_warps=4,
                                      grid=grid, in_specs=in_specs, out_specs=out_specs,
                                      out_shape=out_shape, name="bn_relu_matmul")
    out = results[0][:m] if pad else results[0]
    if not stats:
        return out, None
    return out, results[1] if partials else total_row_sums(results[1])


def partial_rows(m: int, k: int, n: int) -> int:
    """How many programs' shares of its output's sums the forward kernel writes for ``m``
    rows, ``k`` input and ``n`` output channels (:func:`blocks`)."""
    return -(-m // blocks(k, n)[0])


def write_row_sums(ref, out, valid=None) -> None:
    """A kernel program's share of its output's statistics: into ``ref`` (2, N) the sum and
    the sum of squares, in float32, of its output tile ``out`` (rows, N) over the rows;
    ``valid`` (rows,): the rows to count (the others lie past the array), or None for all.
    :func:`total_row_sums` adds up the programs' shares."""
    o = out.astype(jnp.float32)
    if valid is not None:
        o = jnp.where(valid[:, None], o, 0.0)
    ref[0, :] = jnp.sum(o, axis=0)
    ref[1, :] = jnp.sum(o * o, axis=0)


def total_row_sums(partials) -> tuple[jax.Array, jax.Array]:
    """``(sum, sum of squares)``, each (N,), from the programs' shares (P, 2, N) that
    :func:`write_row_sums` wrote, in one reduction."""
    sums = jnp.sum(partials, 0)
    return sums[0], sums[1]


def backward_blocks(m: int, k: int, n: int, wide: bool = False) -> tuple[int, int, int]:
    """``(block_m, block_k, rows)`` of the backward kernel: ``block_k`` input channels a
    program computes (its weight gradient, ``block_k`` x n, accumulates in at most 32 KB of
    float32), ``block_m`` rows a loop step (the cotangent's tile at most 16 KB, 8 KB when
    ``wide``: float32 tiles with the statistics' part and another cotangent of the input
    read too; larger tiles spill registers, ``experiments/kernel_registers.py``), and ``rows``
    per program, a power-of-two multiple of ``block_m``: about 256 programs share the rows
    and channels, each with at least 256 rows, so that its partial sums (``block_k`` x n)
    stay small beside what it reads. Untuned."""
    block_k = max(16, min(k, 8192 // n))
    block_m = max(16, min(128, (2048 if wide else 4096) // max(n, block_k)))
    return block_m, block_k, program_rows(m, block_m, k // block_k)


def program_rows(m: int, block_m: int, channel_blocks: int) -> int:
    """Rows a backward kernel's program takes: a power-of-two multiple of ``block_m``, at
    least 256, so that about 256 programs share the ``m`` rows and ``channel_blocks``
    blocks of input channels."""
    chunks = max(1, 256 // channel_blocks)
    rows = max(block_m, 256)
    while rows * chunks < m:
        rows *= 2
    return rows


def _backward_rows(z, g, mean, mul, shift, w, with_dw: bool = True):
    """The backward pass over some rows: from ``z`` (rows, K) and the output's cotangent
    ``g`` (rows, N), both in z's dtype, ``(d_z in z's dtype, the weight gradient's share
    (K, N) or None without ``with_dw``, and d_x's sums: sum d_x, sum d_x * (z - mean),
    float32)``, where ``d_x`` is the cotangent of the affine map's output. The XLA path runs
    it on all rows, the backward kernel on each block of rows."""
    f32 = jnp.float32
    a = bn_relu_shifted(z, mul, shift)
    d_x = jnp.where(a > 0, jnp.dot(g, w.T, preferred_element_type=f32), 0.0)  # ReLU, cast
    d_w = jnp.dot(a.T, g, preferred_element_type=f32) if with_dw else None
    return ((d_x * mul).astype(z.dtype), d_w, jnp.sum(d_x, axis=0),
            jnp.sum(d_x * (z.astype(f32) - mean), axis=0))


def with_statistics(g, out, d_sum, d_squares):
    """The output's cotangent ``g`` (float32) with the statistics' part added: d(sum o)/do
    = 1 and d(sum o^2)/do = 2 o (``d_sum``, ``d_squares``: (N,), either may be None). The
    XLA path and the backward kernel add it alike."""
    if d_sum is not None:
        g = g + d_sum
    if d_squares is not None:
        g = g + 2.0 * out.astype(jnp.float32) * d_squares
    return g


def _plus(a, b):
    """``a + b`` added in float32 and rounded to a's dtype (two cotangents of one tensor)."""
    return (a.astype(jnp.float32) + b.astype(jnp.float32)).astype(a.dtype)


def _through_bn_relu(d_a, out, mul, shift):
    """The cotangent of a BatchNorm + ReLU's pre-activation from that of its result ``d_a``:
    ``d_a`` where the ReLU passed, else 0, in float32, the mask recomputed from ``out`` as
    the kernels compute it (:func:`bn_relu_shifted`, equal to :func:`bn_relu` up to
    rounding, so the mask may differ where a value lies within rounding of zero)."""
    return jnp.where(bn_relu_shifted(out, mul, shift) > 0, d_a.astype(jnp.float32), 0.0)


def _output_cotangent(d_out, out, through):
    """The output's cotangent in float32: ``d_out`` itself, or with ``through = (mul,
    shift)`` that of ``out`` where ``d_out`` is the cotangent of ``bn_relu_shifted(out,
    *through)`` (:func:`bn_relu_matmul_bn`)."""
    if through is None:
        return d_out.astype(jnp.float32)
    return _through_bn_relu(d_out, out, *through) * through[0]


@functools.partial(jax.jit, static_argnames=("interpret", "with_dz", "with_dw", "derive_fn",
                                             "with_g", "partials"))
def _pallas_backward(z, mean, mul, bias, w, gd, interpret: bool, with_dz: bool = True,
                     with_dw: bool = True, *, out=None, derive_fn=None, derive_operands=(),
                     through=None, d_input=None, with_g: bool = False, partials: bool = False,
                     shift=None):
    """:func:`_backward_rows` on all rows as one Pallas kernel, with ``w`` in z's dtype:
    ``(d_z (M, K) or None without ``with_dz``, d_w (K, N) float32 or None without
    ``with_dw``, (sum d_x, sum d_x * (z - mean)), each (K,) float32, the output's cotangent
    (M, N) in z's dtype or None without ``with_g``)``. Each program reads its rows of ``z``
    and ``gd`` (once per block of input channels), recomputes the activated input in
    registers, writes its rows of ``d_z`` and returns partial sums of the weight gradient and
    of d_x's sums for its rows, added up here. What is not wanted is neither computed nor
    written (XLA cannot drop a kernel's unused outputs).

    ``derive_fn`` (a :class:`StaticPartial`, or None) gives the sums' cotangents ``(d_sum,
    d_squares)``, each (N,) or None, from ``derive_operands`` (small arrays, read by
    indexing: ``a[...]``, ``a[0, :]``; here it is given their refs), in each loop step: the
    sums' cotangents as given (:func:`_given_sums`) or derived from what they are made of
    where XLA would derive them in a kernel of its own. The kernel adds their part to ``gd`` as
    it reads it (:func:`with_statistics`, rounded to z's dtype as :func:`backward`
    rounds it) instead of XLA in a pass of its own; ``with_g`` also writes that sum (the
    residual's cotangent).
    ``out`` (M, N): the forward pass's output, for the sum of squares' part and
    ``through``.
    ``through``: ``(mul, shift)``, each (N,), of a BatchNorm + ReLU applied to the output
    (:func:`bn_relu_matmul_bn`): ``gd`` is then the cotangent of ``bn_relu_shifted(out,
    *through)``, which the kernel takes back to the output's as it reads it
    (:func:`_output_cotangent`) instead of XLA in passes of its own.
    ``d_input``: (M, K), another cotangent of ``z`` (that of :func:`bn_relu_matmul`'s
    ``return_input``), added to ``d_z`` as it is written. With ``partials`` d_w and the
    sums are the programs' shares, (P, K, N) and (P, 2, K), not added up (for
    ``bn_input.finish``). ``shift``: as :func:`_pallas`'s."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    m, k = z.shape
    n = w.shape[1]
    adds = derive_fn is not None or through is not None  # to the output's cotangent
    wide = z.dtype.itemsize == 4 and adds and d_input is not None
    block_m, block_k, rows = backward_blocks(m, k, n, wide)
    grid = (pl.cdiv(m, rows), k // block_k)
    pad = grid[0] * rows - m
    if through is not None and out is None:
        raise ValueError("_pallas_backward: through needs out")
    # zero cotangent rows add nothing to any sum (but d_sum's part: masked in the kernel)
    z, gd, out, d_input = pad_rows(pad, z, gd, out, d_input)
    dt, f32 = z.dtype, jnp.float32
    mul2, shift2 = through if through is not None else (None, None)
    derived = [(f"derive{i}", a) for i, a in enumerate(derive_operands)]
    optional = [(name, value) for name, value in (("out", out), ("d_input", d_input),
                                                  ("mul2", mul2), ("shift2", shift2),
                                                  *derived)
                if value is not None]

    def kernel(z_ref, mean_ref, mul_ref, shift_ref, w_ref, g_ref, *refs):
        ins = named_refs(refs, [*(name for name, _ in optional), *backward_outputs(
            with_dz, with_dw), "g" if with_g else None])
        dz_ref, dw_ref, sums_ref, g_out_ref = (ins.get(k) for k in ("dz", "dw", "sums", "g"))
        coefficients = mean_ref[...], mul_ref[...], shift_ref[...]
        first = pl.program_id(1) == 0  # one block of input channels writes the cotangent
        base = pl.program_id(0) * rows  # (program ids are read here, outside the loop)

        def step(j, carry):
            here = pl.ds(j * block_m, block_m)
            g = g_ref[here, :]
            if adds:
                # the sums' cotangents from derive's operands (fn indexes their refs, as it
                # indexes arrays on the XLA path), in the loop: held across it, they spill
                statistics = ((None, None) if derive_fn is None
                              else derive_fn(*(ins[name] for name, _ in derived)))
                o = ins["out"][here, :] if "out" in ins else None
                after = None if through is None else (ins["mul2"][...], ins["shift2"][...])
                total = with_statistics(_output_cotangent(g, o, after), o, *statistics)
                if pad:  # d_sum would make the padding rows' cotangent nonzero
                    row = base + j * block_m + jax.lax.broadcasted_iota(jnp.int32,
                                                                        (block_m, 1), 0)
                    total = jnp.where(row < m, total, 0.0)
                g = total.astype(dt)
                if with_g:
                    @pl.when(first)
                    def _():
                        g_out_ref[here, :] = g
            dz, d_w, s_x, s_xz = _backward_rows(z_ref[here, :], g, *coefficients,
                                                w_ref[...], with_dw)
            if with_dz:
                dz_ref[here, :] = _plus(dz, ins["d_input"][here, :]) if "d_input" in ins else dz
            sums = carry[0] + s_x, carry[1] + s_xz
            return (*sums, carry[2] + d_w) if with_dw else sums

        zeros = jnp.zeros((block_k,), jnp.float32)
        init = (zeros, zeros, jnp.zeros((block_k, n), jnp.float32))[:3 if with_dw else 2]
        carry = jax.lax.fori_loop(0, rows // block_m, step, init)
        sums_ref[0, :] = carry[0]
        sums_ref[1, :] = carry[1]
        if with_dw:
            dw_ref[...] = carry[2]

    rows_k = pl.BlockSpec((rows, block_k), lambda i, j: (i, j))
    rows_n = pl.BlockSpec((rows, n), lambda i, j: (i, 0))
    vector = pl.BlockSpec((block_k,), lambda i, j: (j,))
    whole = pl.BlockSpec((n,), lambda i, j: (0,))
    in_specs = [rows_k, vector, vector, vector, pl.BlockSpec((block_k, n), lambda i, j: (j, 0)),
                rows_n]
    args = [z, mean, mul, shift_of(mean, mul, bias) if shift is None else shift,
            w.astype(dt), gd]
    spec = {"out": rows_n, "d_input": rows_k, "mul2": whole, "shift2": whole,
            **{name: pl.BlockSpec(a.shape, lambda i, j, d=a.ndim: (0,) * d)
               for name, a in derived}}
    in_specs += [spec[name] for name, _ in optional]
    args += [value for _, value in optional]
    out_specs, out_shape = [], []
    if with_dz:
        out_specs.append(rows_k)
        out_shape.append(jax.ShapeDtypeStruct((m + pad, k), dt))
    if with_dw:
        out_specs.append(pl.BlockSpec((None, block_k, n), lambda i, j: (i, j, 0)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0], k, n), f32))
    out_specs.append(pl.BlockSpec((None, 2, block_k), lambda i, j: (i, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((grid[0], 2, k), f32))
    if with_g:
        out_specs.append(rows_n)
        out_shape.append(jax.ShapeDtypeStruct((m + pad, n), dt))
    results = list(kernel_impl.pallas_call(
        kernel, *args, interpret=interpret, num_warps=8, grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, name="bn_relu_matmul_backward"))
    g = results.pop()[:m] if with_g else None
    dz = results.pop(0)[:m] if with_dz else None
    if partials:
        return dz, results[0] if with_dw else None, results[-1], g
    d_w, sums = total_partials(results[-1], results[0] if with_dw else None)
    return dz, d_w, sums, g


def named_refs(refs, names) -> dict:
    """In a kernel: its refs after the fixed operands, by name; ``names`` in the order the
    refs come (the optional inputs, then the outputs), None for one not passed."""
    refs = iter(refs)
    return {name: next(refs) for name in names if name is not None}


def backward_outputs(with_dz: bool, with_dw: bool) -> tuple:
    """The names (:func:`named_refs`) of a backward kernel's outputs, in order: the input's
    cotangent "dz" and the weight gradient's shares "dw" where wanted, the partial sums
    "sums"."""
    return ("dz" if with_dz else None, "dw" if with_dw else None, "sums")


def total_partials(sums, d_w=None):
    """``(d_w or None, (sum d_x, sum d_x * (z - mean)))`` from a backward kernel's
    programs' partial sums: ``sums`` (P, 2, K) and the weight gradient's shares ``d_w`` (P,
    ...) or None, added up side by side in one reduction; d_w keeps its shape past P."""
    p, _, k = sums.shape
    parts = [sums.reshape(p, 2 * k)] + ([] if d_w is None else [d_w.reshape(p, -1)])
    total = jnp.sum(jnp.concatenate(parts, axis=1), 0)
    return (None if d_w is None else total[2 * k:].reshape(d_w.shape[1:]),
            (total[:k], total[k:2 * k]))


def affine_cotangents(mean, mul, bias, sums) -> tuple:
    """The cotangents of a BatchNorm's ``(mean, mul, bias)`` (in their dtypes) from a
    backward kernel's ``sums = (sum d_x, sum d_x * (z - mean))``, d_x being the cotangent of
    ``(z - mean) * mul + bias``."""
    d_bias, d_mul = sums
    return ((-mul * d_bias).astype(mean.dtype), d_mul.astype(mul.dtype),
            d_bias.astype(bias.dtype))


#: The operands of :func:`backward`'s result, in order.
OPERANDS = ("z", "mean", "mul", "bias", "w", "residual", "out_bias")


def backward(z, mean, mul, bias, w, residual, out_bias, out, cotangents, stats: bool,
             out_relu: bool, impl: str = "xla", wanted=OPERANDS, d_input=None, through=None,
             derive=None, partials: bool = False, shift=None):
    """The derivative of :func:`reference`, written out: the cotangents of ``(z, mean, mul,
    bias, w, residual, out_bias)`` from those of ``(out, sums)``, given the forward pass's
    ``out``; None for an operand not in ``wanted`` (names from :data:`OPERANDS`) or None.
    ``d_input``, if given, is another cotangent of ``z`` (:func:`bn_relu_matmul`'s
    ``return_input``), added to z's.
    The activation is recomputed as the kernels compute it (:func:`bn_relu_shifted`), equal
    to ``reference``'s up to rounding, so the ReLU's mask may differ where an input lies
    within rounding of zero.
    Unlike autodiff of the plain computation it does not recompute the product ``out`` (the
    statistics' derivative needs it). ``impl``: "xla" (XLA ops), "pallas" (the backward
    kernel, :func:`_pallas_backward`, which recomputes the activated input in registers
    instead of in memory, adds ``d_input`` to z's cotangent as it writes it, and computes no
    ``z`` or ``w`` cotangent that is not wanted) or "interpret" (that kernel interpreted).
    The kernel also adds the statistics' part to the output's cotangent as it reads it,
    except where XLA must form that sum: with ``out_relu`` (the ReLU masks it), a wanted
    ``out_bias`` (its gradient sums it) or a wanted residual of another dtype than z's
    (its cotangent is the float32 sum); none of these occurs in training.
    ``cotangents``' sums, or either of them, may be None (zero). With ``through = (mul2,
    shift2)`` the output's cotangent in ``cotangents`` is that of a BatchNorm + ReLU of
    ``out``, ``bn_relu_shifted(out, *through)``, instead (:func:`bn_relu_matmul_bn`),
    which the backward kernel takes back to the output's itself. ``derive = (fn,
    operands)`` gives the sums' cotangents as ``fn(*operands)`` in place of
    ``cotangents``' (which must then be None; small arrays), which the backward kernel
    computes itself (:func:`_pallas_backward`, which takes given sums the same way).
    ``fn`` is called on the operands' refs in the kernel and on the arrays elsewhere, so
    it must read them by indexing (``a[...]``, ``a[0, :]``, ``a[:c]``); it is a static
    argument of the jitted backward kernel, so it must be a :class:`StaticPartial` (equal
    for equal function and arguments: the calls of one shape then share one build).
    With ``partials`` it returns ``(cotangents, (sums (P, 2, K), d_w (P, K, N) or None))``:
    the kernel's partial sums of ``(sum d_x, sum d_x * (z - mean))`` and of the weight
    gradient, not added up (the kernels' impls only), for ``bn_input.finish``; mean's,
    mul's, bias's and w's cotangents are then None. ``shift``: as :func:`_pallas`'s."""
    kernel_impl.check_explicit("backward", impl)
    if partials and impl == "xla":
        raise ValueError("backward: partials are the backward kernel's; impl 'xla' has none")
    dt = z.dtype
    d_out, (d_sum, d_squares) = cotangents[0], cotangents[1] or (None, None)
    if derive is not None and (d_sum is not None or d_squares is not None):
        raise ValueError("backward: derive computes the sums' cotangents; got them too")
    if derive is not None and not isinstance(derive[0], StaticPartial):
        raise ValueError(f"backward: derive's function must be a pointwise.StaticPartial, got "
                         f"{type(derive[0]).__name__}")
    if not stats:
        d_sum = d_squares = derive = None
    wants_residual = residual is not None and "residual" in wanted
    in_kernel = (impl != "xla" and not out_relu and (out_bias is None or "out_bias" not in wanted)
                 and (not wants_residual or residual.dtype == dt))
    # the output is read for the sum of squares' part and the ReLU's mask
    reads_out = d_squares is not None or derive is not None or through is not None
    if derive is None and (d_sum is not None or d_squares is not None):
        derive = (StaticPartial(_given_sums, (d_sum is not None, d_squares is not None)),
                  tuple(d for d in (d_sum, d_squares) if d is not None))
    if in_kernel:
        g, gd = None, d_out.astype(dt)  # the statistics' part is added by the kernel
    else:  # formed here: the kernel, if it runs, adds nothing
        d_sums = (None, None) if derive is None else derive[0](*derive[1])
        g = with_statistics(_output_cotangent(d_out, out, through), out, *d_sums)
        if out_relu:
            g = jnp.where(out > 0, g, 0.0)
        gd, derive, through = g.astype(dt), None, None
    adds = derive is not None or through is not None  # in the kernel, to gd
    if impl == "xla":
        d_z, d_w, *sums = _backward_rows(z, gd, mean, mul, shift_of(mean, mul, bias)
                                         if shift is None else shift, w.astype(dt))
        if d_input is not None:
            d_z = _plus(d_z, d_input)
    else:
        with_g = wants_residual and adds
        d_z, d_w, sums, g_kernel = _pallas_backward(
            z, mean, mul, bias, w, gd, impl == "interpret", "z" in wanted, "w" in wanted,
            out=out if adds and reads_out else None,
            derive_fn=None if derive is None else derive[0],
            derive_operands=() if derive is None else tuple(derive[1]), through=through,
            d_input=d_input, with_g=with_g, partials=partials, shift=shift)
        if with_g:
            gd = g_kernel
    affine_grads = (None,) * 3 if partials else affine_cotangents(mean, mul, bias, sums)
    result = (d_z, *affine_grads,
              None if d_w is None or partials else d_w.astype(w.dtype),
              None if not wants_residual else (gd if residual.dtype == dt
                                                else g.astype(residual.dtype)),
              None if out_bias is None or "out_bias" not in wanted
              else jnp.sum(g, 0).astype(out_bias.dtype))
    result = tuple(c if name in wanted else None
                   for name, c in zip(OPERANDS, result, strict=True))
    if partials:
        return result, (sums, d_w if "w" in wanted else None)
    return result


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _kernel(z, mean, mul, bias, w, residual, out_bias, stats, out_relu, interpret,
            return_input):
    out, sums = _pallas(z, mean, mul, bias, w, residual, out_bias, stats, out_relu, interpret)
    return (out, sums, z) if return_input else (out, sums)


def _kernel_fwd(*args):
    """With symbolic zeros: the operands come as ``CustomVJPPrimal``s (value, perturbed);
    the names of the perturbed ones travel to the backward pass as the keys of an empty
    dict (static, in the residuals' structure)."""
    primals, flags = args[:7], args[7:]
    values = [None if p is None else p.value for p in primals]
    wanted = perturbed(OPERANDS, primals)
    out, sums = _pallas(*values, *flags[:3])
    results = (out, sums, values[0]) if flags[3] else (out, sums)
    return results, (*values, out, wanted)


def perturbed(names, primals) -> dict:
    """The names of the perturbed ``CustomVJPPrimal``s among ``primals`` (None: an absent
    operand), as the keys of an empty dict: static, in the residuals' structure."""
    return {name: None for name, p in zip(names, primals, strict=True)
            if p is not None and p.perturbed}


def _kernel_bwd(stats, out_relu, interpret, return_input, saved, cotangents):
    """Symbolic zeros in the cotangents become zeros (the output's) or None (each sum's, and
    the returned input's)."""
    d_out, d_sums, *d_input = cotangents
    d_out = dense(d_out)
    d_sums = sums_or_none(d_sums)
    d_input = or_none(d_input[0]) if d_input else None
    *operands, out, wanted = saved
    return backward(*operands, out, (d_out, d_sums), stats, out_relu,
                    impl="interpret" if interpret else "pallas", wanted=tuple(wanted),
                    d_input=d_input)


_kernel.defvjp(_kernel_fwd, _kernel_bwd, symbolic_zeros=True)


def bn_relu_matmul(z, mean, mul, bias, w, residual=None, *, out_bias=None,
                   out_relu: bool = False, stats: bool = False, return_input: bool = False,
                   impl: str = "auto"):
    """``relu((z - mean) * mul + bias) @ w (+ out_bias) (+ residual)``, then a ReLU if
    ``out_relu``, over the last axis of ``z`` (any leading axes: an NHWC activation is a 1x1
    convolution's input), and with ``stats`` the output channels' ``(sum, sum of squares)``
    in float32 (else None). ``mean``, ``mul``, ``bias``: (K,) float32 (a BatchNorm's
    statistics and ``scale / sqrt(var + eps)``); ``w``: (K, N); ``out_bias``: (N,) float32
    (e.g. the next BatchNorm folded in, with ``out_relu``); ``residual``: the output's shape.
    ``impl``: one of :data:`IMPLS` (module docstring). ValueError for shapes that do not fit.

    With ``return_input`` it returns ``z`` too, as a third result to use in its place
    elsewhere (a residual block's shortcut): the backward kernel then adds that use's
    cotangent to z's as it writes it, where XLA would add the two in a pass of its own.
    """
    kernel_impl.check("bn_relu_matmul", impl)
    lead = z.shape[:-1]
    if residual is not None and residual.shape != (*lead, w.shape[-1]):
        raise ValueError(f"bn_relu_matmul: residual must be {(*lead, w.shape[-1])} (z "
                         f"{z.shape} times w {w.shape}), got {residual.shape}")
    flat = z.reshape(-1, z.shape[-1])
    res = None if residual is None else residual.reshape(flat.shape[0], -1)

    def plain(*args):
        out, sums = reference(*args, stats=stats, out_relu=out_relu)
        return (out, sums, args[0]) if return_input else (out, sums)

    def kernel(*args, interpret=impl == "interpret"):
        return _kernel(*args, stats, out_relu, interpret, return_input)

    compute = functools.partial(kernel_impl.dispatch, impl, kernel, plain)
    args = (flat, mean, mul, bias, w, res, out_bias)
    if impl == "xla" or (impl == "auto" and not kernel_fits(*w.shape)):
        results = plain(*args)
    else:
        axes = row_axes(flat.shape[0])
        split = (True, False, False, False, False, True, False)  # z and the residual
        results = (on_own_rows(compute, axes, split, return_input) if axes
                   else compute)(*args)
    out, sums = results[0].reshape(*lead, w.shape[-1]), results[1]
    return (out, sums, results[2].reshape(z.shape)) if return_input else (out, sums)


class _FromSums:
    """:func:`bn_relu_matmul` as ``bn_input.apply``'s ``op``; ``flags``: ``(stats,
    return_input, interpret, shares)``: with ``shares`` the output's sums as
    ``batchnorm.Sums`` of the programs' shares."""

    names = ("w", "residual")

    @staticmethod
    def forward(flags, z, mean, mul, bias, w, residual, shift=None):
        stats, return_input, interpret, shares = flags
        out, sums = _pallas(z, mean, mul, bias, w, residual, None, stats, False, interpret,
                            shift, shares)
        if sums is not None and shares:
            sums = bn_input.shares_of(sums)
        return ((out, sums, z) if return_input else (out, sums)), (
            z, mean, mul, bias, w, residual, out if stats else None, shift)

    @staticmethod
    def backward(flags, residuals, cotangents, wanted):
        stats, _, interpret, _ = flags
        d_out, d_sums, *d_input = cotangents
        grads, (sums, d_w) = backward(
            *residuals[:6], None, residuals[6], (dense(d_out), sums_or_none(d_sums)),
            stats, False, impl="interpret" if interpret else "pallas",
            wanted=tuple(name for name in ("z", "w", "residual") if name in wanted),
            d_input=or_none(d_input[0]) if d_input else None, partials=True,
            shift=residuals[7])
        return grads[0], (None, grads[5]), sums, d_w


def bn_relu_matmul_from_sums(z, sums, scale, bias, w, residual=None, *, epsilon: float,
                             stats: bool = False, return_input: bool = False,
                             shares: bool = False, impl: str = "auto"):
    """:func:`bn_relu_matmul` with its BatchNorm in train mode, given as ``sums`` (z's
    channels' sum and sum of squares over all its rows, float32), ``scale`` and ``bias``
    (K,) and ``epsilon``: ``mean`` and ``mul`` as ``batchnorm.batch_coefficients`` forms
    them. Returns ``(out, (mean, var), out's sums or None[, z])``: the batch statistics for
    the running ones (``batchnorm.BatchNormApplied``). With the kernel, the BatchNorm's
    derivative and the backward kernel's partial sums are added up in one kernel
    (``bn_input.apply``), where autodiff of the coefficients takes two, and given shares
    its coefficients are formed in one more; without it (and in
    a data-parallel program, ``row_axes``), the coefficients in XLA ops and
    :func:`bn_relu_matmul`, differentiated as composed. ``sums`` may be ``batchnorm.Sums``;
    with ``shares`` (and ``stats``) the output's sums are too, the forward kernel's
    programs' shares where it runs, for the next kernel's op to add up with its
    coefficients in one kernel."""
    kernel_impl.check("bn_relu_matmul_from_sums", impl)
    flat = z.reshape(-1, z.shape[-1])
    res = None if residual is None else residual.reshape(flat.shape[0], -1)
    _check(flat, sums[0], sums[1], bias, w, res)  # the sums (or Sums' zeros), bias (K,)
    check_scale("bn_relu_matmul_from_sums", scale, bias)
    shares = shares and stats

    def plain(*operands, impl):
        return bn_relu_matmul(*operands, stats=stats, return_input=return_input, impl=impl)

    composed = impl == "xla" or (impl == "auto" and not kernel_fits(*w.shape)) or bool(
        row_axes(len(flat)))
    results = bn_input.from_sums(
        _FromSums, (stats, return_input, impl == "interpret", shares), epsilon, plain, impl,
        composed, partial_rows(len(flat), *w.shape) if shares else None, flat, sums, scale,
        bias, w, res)
    out = results[0].reshape(*z.shape[:-1], w.shape[-1])
    return (out, *results[1:3], *(r.reshape(z.shape) for r in results[3:]))


def check_scale(name: str, scale, bias) -> None:
    """ValueError, led by ``name``, unless a BatchNorm's ``scale`` has its ``bias``'s shape."""
    if scale.shape != bias.shape:
        raise ValueError(f"{name}: scale must be {bias.shape} as the bias, got {scale.shape}")


def _after(out, sums, scale, offset, epsilon: float):
    """The BatchNorm + ReLU that follows the kernel, in train mode and XLA ops: ``(bn_relu(out,
    mean, mul, offset), (mean, var))``, the statistics those of ``out``'s rows (``sums``)."""
    mean, var, mul = batch_coefficients(*sums, scale, out.shape[0], epsilon)
    return bn_relu(out, mean, mul, offset), (mean, var)


def _sums_cotangents(stats, pair, mul, d_mean, d_var, n: int, epsilon: float):
    """The cotangents of a BatchNorm's statistics sums (``stats[0, :]``, ``stats[1, :]``:
    sum and sum of squares over ``n`` values) from those of its offset and multiplier
    (``pair[:N]``, ``pair[N:]``: the sums of ``d_pre`` and ``d_pre * (x - mean)``,
    ``d_pre`` the cotangent of its pre-activation) and of the batch mean and variance it
    returns (``d_mean``, ``d_var``): ``bn_input.moments_cotangents``, reading its operands
    by indexing, so that the backward kernel can give it refs (``mul[...]``)."""
    mean = stats[0, :] / n
    channels = mean.shape[0]
    return bn_input.moments_cotangents(mean, stats[1, :] / n - mean * mean, mul[...],
                                       pair[:channels], pair[channels:2 * channels], n,
                                       epsilon, d_mean, d_var)


@dataclasses.dataclass(frozen=True)
class StaticPartial:
    """``func`` with its first arguments ``args`` bound (as ``functools.partial``), equal to
    another of the same function and arguments: a static argument of the jitted backward
    kernel (``derive_fn``), so that its calls with the same shapes share one trace and one
    lowering (PreResNet-110 calls it 72 times)."""

    func: Callable
    args: tuple

    def __call__(self, *rest):
        return self.func(*self.args, *rest)


def _given_sums(has_sum: bool, has_squares: bool, *given):
    """``backward``'s ``derive`` for sums' cotangents that are given: ``(d_sum,
    d_squares)`` from ``given`` (each read by indexing; None where not given)."""
    return (given[0][...] if has_sum else None,
            given[int(has_sum)][...] if has_squares else None)


def _derived_sums_cotangents(has_mean: bool, has_var: bool, n: int, epsilon: float, stats,
                             pair, mul, *given):
    """:func:`_sums_cotangents` as ``backward``'s ``derive`` calls it: the batch mean's and
    variance's cotangents among ``given`` where they are not zero (``has_mean``,
    ``has_var``, in that order), every operand read by indexing (refs in the kernel)."""
    d_mean = given[0][...] if has_mean else 0.0
    d_var = given[int(has_mean)][...] if has_var else 0.0
    return _sums_cotangents(stats, pair, mul, d_mean, d_var, n, epsilon)


#: The differentiable operands of :func:`bn_relu_matmul_bn`, in order.
BN_OPERANDS = ("z", "mean", "mul", "bias", "w", "scale", "offset")


def _bn_forward(operands, epsilon, interpret, return_input):
    """:func:`_kernel_bn`'s results, with the kernel's output and sums."""
    out, sums = _pallas(*operands[:5], None, None, True, False, interpret)
    a, stats = _after(out, sums, *operands[5:], epsilon)
    return ((a, stats, operands[0]) if return_input else (a, stats)), out, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _kernel_bn(z, mean, mul, bias, w, scale, offset, epsilon, interpret, return_input):
    return _bn_forward((z, mean, mul, bias, w, scale, offset), epsilon, interpret,
                       return_input)[0]


def _kernel_bn_fwd(*args):
    """As :func:`_kernel_fwd`."""
    primals, flags = args[:7], args[7:]
    values = [p.value for p in primals]
    results, out, sums = _bn_forward(values, *flags)
    return results, (*values, out, sums, perturbed(BN_OPERANDS, primals))


def _kernel_bn_bwd(epsilon, interpret, return_input, saved, cotangents):
    """One XLA reduction over ``(d_a, out)`` gives the BatchNorm's offset and multiplier
    gradients (hence its scale's); the backward kernel derives the output sums' cotangents
    from them (``backward``'s ``derive``: :func:`_sums_cotangents`) and takes ``d_a`` back
    to the output's cotangent as it reads it (``backward``'s ``through``)."""
    *operands, out, sums, wanted = saved
    scale, offset = operands[5:]
    d_a, d_stats, *d_input = cotangents
    d_a = dense(d_a)
    d_input = or_none(d_input[0]) if d_input else None
    (mean, var, mul), coefficients_vjp = jax.vjp(
        functools.partial(batch_coefficients, n=out.shape[0], epsilon=epsilon), *sums, scale)
    shift = shift_of(mean, mul, offset)  # not offset, a slice of a packed vector in training
    d_pre = _through_bn_relu(d_a, out, mul, shift)
    # both sums in one buffer, whole for the backward kernel
    pair = channel_sums_side_by_side(d_pre, d_pre * (out.astype(jnp.float32) - mean))
    d_offset, d_mul = pair[:len(mean)], pair[len(mean):]
    # the scale reaches the result through the multiplier alone
    d_scale = coefficients_vjp((jnp.zeros_like(mean), jnp.zeros_like(var), d_mul))[2]
    d_mean, d_var = sums_or_none(d_stats)

    # the sums side by side as the forward kernel's reduction wrote them: a whole buffer
    derive = (StaticPartial(_derived_sums_cotangents, (d_mean is not None, d_var is not None,
                                                       out.shape[0], epsilon)),
              (jnp.stack(sums), pair, mul, *(d for d in (d_mean, d_var) if d is not None)))
    grads = (None,) * 5
    if any(name in wanted for name in OPERANDS[:5]):  # else no backward kernel is needed
        grads = backward(*operands[:5], None, None, out, (d_a, None), True, False,
                         impl="interpret" if interpret else "pallas", wanted=tuple(wanted),
                         d_input=d_input, through=(mul, shift), derive=derive)
    return (*grads[:5], d_scale if "scale" in wanted else None,
            d_offset if "offset" in wanted else None)


_kernel_bn.defvjp(_kernel_bn_fwd, _kernel_bn_bwd, symbolic_zeros=True)


def bn_relu_matmul_bn(z, mean, mul, bias, w, scale, offset, epsilon: float, *,
                      return_input: bool = False, impl: str = "auto"):
    """:func:`bn_relu_matmul` (``stats=True``, no residual) followed by the next BatchNorm +
    ReLU in train mode: ``relu((out - mean2) * rsqrt(var2 + epsilon) * scale + offset)``
    with ``(mean2, var2)`` the batch statistics of the output ``out`` (fast variance, as
    ``BatchNormCoefficients`` computes them) and ``scale``, ``offset`` (N,) float32 that
    BatchNorm's parameters. Returns ``(a, (mean2, var2))``, ``a`` like ``out``, and ``z``
    too with ``return_input`` (as :func:`bn_relu_matmul`'s).

    Why one function: in the derivative, the BatchNorm + ReLU's own part (the ReLU's mask,
    the product with ``mul2`` and the statistics' part) is applied by the backward kernel
    as it reads ``a``'s cotangent, after one XLA reduction over that cotangent and ``out``
    for the BatchNorm's gradients (both recompute the ReLU's mask from ``out`` in the
    kernels' form, :func:`bn_relu_shifted`, while ``a`` is computed as :func:`bn_relu`
    computes it: the masks may differ where a value lies within rounding of zero).
    Composed, XLA writes the cotangent of ``out`` in passes of its own first
    (docs/benchmarks.md, "Fewer passes: the BatchNorm after the kernel in the backward
    kernel"). In a data-parallel program (``row_axes``) and without the kernel,
    :func:`bn_relu_matmul` and the BatchNorm in XLA ops, differentiated as composed.
    """
    kernel_impl.check("bn_relu_matmul_bn", impl)
    flat = z.reshape(-1, z.shape[-1])
    n = w.shape[-1]
    if scale.shape != (n,) or offset.shape != (n,):
        raise ValueError(f"bn_relu_matmul_bn: scale and offset must be ({n},) for w "
                         f"{w.shape}, got {scale.shape} and {offset.shape}")
    args = (flat, mean, mul, bias, w, scale, offset)

    def composed(*operands, impl=impl):
        out, sums, *rest = bn_relu_matmul(*operands[:5], stats=True,
                                          return_input=return_input, impl=impl)
        return (*_after(out, sums, *operands[5:], epsilon), *rest)

    def kernel(*operands):
        return _kernel_bn(*operands, epsilon, impl == "interpret", return_input)

    if impl == "xla" or (impl == "auto" and not kernel_fits(*w.shape)) or row_axes(len(flat)):
        results = composed(*args)
    else:
        _check(*args[:5], None)
        results = kernel_impl.dispatch(impl, kernel, functools.partial(composed, impl="xla"),
                                       *args)
    a, stats = results[0].reshape(*z.shape[:-1], n), results[1]
    return (a, stats, results[2].reshape(z.shape)) if return_input else (a, stats)


def row_axes(m: int) -> tuple[str, ...]:
    """The axes of JAX's context mesh that a data-parallel program splits its batch over (its
    automatic axes; ``sharding.data_parallel`` traces under the mesh), when they split ``m``
    rows evenly over more than one device; else ()."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
                 if kind == jax.sharding.AxisType.Auto)
    devices = math.prod(mesh.shape[name] for name in axes)
    return axes if devices > 1 and m % devices == 0 else ()


def on_own_rows(compute, axes: tuple[str, ...], split: tuple[bool, ...],
                return_input: bool = False):
    """``compute`` on each device's own rows (``shard_map`` over ``axes``): the operands
    marked in ``split`` split by their first axis (rows, or images), the others whole, and
    ``compute``'s results ``(out, sums or None[, z])`` with the statistics summed over the
    devices. XLA's SPMD partitioner cannot split a custom kernel: without this it gathers
    the rows and runs the kernel on the whole batch on every device. The derivative
    follows: shard_map's transpose sums the weight and BatchNorm gradients over the devices.
    ``check_vma=False``: Pallas kernels do not declare how their outputs vary over the
    mesh. With ``return_input`` the returned ``z`` (a third result of rows: ``chain``'s
    second output uses it too) is split by rows too."""
    rows, whole = P(axes), P()

    def local(*args):
        out, sums, *z = compute(*args)
        return out, None if sums is None else jax.lax.psum(sums, axes), *z

    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=tuple(rows if s else whole for s in split),
                         out_specs=(rows, whole, rows)[:3 if return_input else 2],
                         check_vma=False)
