"""A block's last 1x1 convolution and the next block's first as one GPU kernel (evaluation).

In evaluation with BatchNorm folded (``PreResNet(fold_bn=True)`` with the ``pointwise``
kernels) a bottleneck block ends with conv3's kernel, which reads the activated input ``a``
(M, K), multiplies by ``w`` (K, N), adds the shortcut ``residual`` (M, N) and writes the
block's output; the next block's conv1 kernel then reads that output again to apply its
bn1 + ReLU, multiply by its (folded) filter and write its activated output. Here one kernel
does both: each program computes a block of rows of the output, writes it, and applies the
next BatchNorm + ReLU and product to the rows it has just computed, in registers. The
block's output is read once (by the next residual add) instead of twice: 12 of a block's
16 activation passes per pixel where its width is C and its output's 4C (docs/benchmarks.md,
"Two 1x1 convolutions in one kernel for evaluation"). In train mode the next BatchNorm
needs the whole batch's statistics of the output first, so no such kernel can exist there.

:func:`matmul_chain` computes what ``pointwise.bn_relu_matmul`` computes called twice: ``out
= relu(a) @ w + residual`` (``a`` is activated already: conv3's BatchNorm is folded into the
convolution before it, so the ReLU changes nothing), then ``relu(relu((out - mean) * mul +
bias) @ w_next + bias_next)`` (bn1 with running statistics, bn2 folded into ``w_next`` and
``bias_next``). ``impl`` (``kernel_impl``) as there: "auto" the kernel where the program is
compiled for an NVIDIA GPU and the channel counts fit (:func:`chain_fits`), the two XLA
computations elsewhere (the same ops as before this kernel, so CPU results are unchanged);
"pallas", "interpret" (tests) and "xla". Its derivative is that of the plain computation
(``custom_vjp``): evaluation is not trained, but stays differentiable. Block sizes follow a
rule (:func:`chain_blocks`) under which ptxas for the H100 finds no spills; untuned, and not
yet timed on a card.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mcu_jax import kernel_impl
from mcu_jax.models import pointwise as pw


def chain_fits(k: int, n: int, n_next: int) -> bool:
    """Whether the kernel takes ``k``, ``n`` and ``n_next`` channels: the 1x1 kernel's
    (``pointwise.kernel_fits``) for both products, with ``k`` and ``n_next`` at most 64,
    the sizes whose registers were checked (``experiments/kernel_registers.py``:
    PreResNet-110's pairs, whose input tile stays in registers through the loop); "auto"
    runs the plain computation otherwise."""
    return pw.kernel_fits(k, n) and pw.kernel_fits(n, n_next) and max(k, n_next) <= 64


def chain_blocks(k: int, n: int, n_next: int) -> tuple[int, int]:
    """``(block_m, block_n)``: rows a program computes and the output channels it takes at a
    time (the first product in column chunks of ``block_n``, each added into the second
    product as soon as it is written): the chunk's tiles (``block_m`` x ``block_n``, ``k`` x
    ``block_n``, ``block_n`` x ``n_next``) and the second product's accumulator (``block_m``
    x ``n_next``) within 4,096 values each, for the channel counts of :func:`chain_fits`
    (64 rows for each of PreResNet-110's pairs)."""
    block_n = min(n, 64)
    return max(16, min(128, 4096 // max(k, block_n, n_next))), block_n


def _check(a, w, residual, mean, mul, bias, w_next, bias_next) -> tuple[int, int, int, int]:
    m, k = a.shape
    n = w.shape[-1]
    if (w.shape != (k, n) or residual.shape != (m, n)
            or any(v.shape != (n,) for v in (mean, mul, bias))
            or w_next.ndim != 2 or w_next.shape[0] != n
            or bias_next.shape != (w_next.shape[1],)):
        raise ValueError(
            f"matmul_chain: a (M, K) = {a.shape} needs w (K, N), residual (M, N), mean, mul "
            f"and bias (N,), w_next (N, N2) and bias_next (N2,); got w {w.shape}, residual "
            f"{residual.shape}, mean {mean.shape}, mul {mul.shape}, bias {bias.shape}, "
            f"w_next {w_next.shape}, bias_next {bias_next.shape}")
    return m, k, n, w_next.shape[1]


def reference(a, w, residual, mean, mul, bias, w_next, bias_next):
    """The computation in jax.numpy: ``(out (M, N), next (M, N2))``, both in a's dtype, as
    two calls of ``pointwise.bn_relu_matmul`` compute them (conv3's input map the identity,
    then its ReLU)."""
    _check(a, w, residual, mean, mul, bias, w_next, bias_next)
    out, _ = pw.bn_relu_matmul(a, *pw.identity(a.shape[-1]), w, residual, impl="xla")
    following, _ = pw.bn_relu_matmul(out, mean, mul, bias, w_next, out_bias=bias_next,
                                     out_relu=True, impl="xla")
    return out, following


@functools.partial(jax.jit, static_argnames=("interpret",))
def _pallas(a, w, residual, mean, mul, bias, w_next, bias_next, interpret: bool):
    """The Pallas kernel; arguments and results as :func:`reference`."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only

    m, k, n, n_next = _check(a, w, residual, mean, mul, bias, w_next, bias_next)
    if not chain_fits(k, n, n_next):
        raise ValueError(f"matmul_chain: the Pallas kernel needs K, N and N2 powers of two "
                         f"from 16 to 512, K and N2 at most 64; got K={k}, N={n}, "
                         f"N2={n_next} (impl='xla' takes any)")
    dt = a.dtype
    block_m, block_n = chain_blocks(k, n, n_next)
    programs = -(-m // block_m)
    pad = programs * block_m - m
    a, residual = pw.pad_rows(pad, a, residual)

    def kernel(a_ref, w_ref, r_ref, mul_ref, shift_ref, wn_ref, bn_ref, out_ref, next_ref):
        x = jax.nn.relu(a_ref[...])  # conv3's BatchNorm map, the identity, and its ReLU
        acc = jnp.zeros((block_m, n_next), jnp.float32)
        for j in range(n // block_n):  # the output in column chunks, each used at once
            cols = slice(j * block_n, (j + 1) * block_n)
            c = jnp.dot(x, w_ref[:, cols], preferred_element_type=jnp.float32)
            out = pw.epilogue(c, None, r_ref[:, cols], False, dt)
            out_ref[:, cols] = out
            act = pw.bn_relu_shifted(out, mul_ref[cols], shift_ref[cols])
            acc = acc + jnp.dot(act, wn_ref[cols, :], preferred_element_type=jnp.float32)
        next_ref[...] = pw.epilogue(acc, bn_ref[...], None, True, dt)

    rows = lambda width: pl.BlockSpec((block_m, width), lambda i: (i, 0))  # noqa: E731
    whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out, following = kernel_impl.pallas_call(
        kernel, a, w.astype(dt), residual, mul, pw.shift_of(mean, mul, bias),
        w_next.astype(dt), bias_next, interpret=interpret, num_warps=4, grid=(programs,),
        in_specs=[rows(k), whole(k, n), rows(n), whole(n), whole(n), whole(n, n_next),
                  whole(n_next)],
        out_specs=[rows(n), rows(n_next)],
        out_shape=[jax.ShapeDtypeStruct((m + pad, n), dt),
                   jax.ShapeDtypeStruct((m + pad, n_next), dt)],
        name="matmul_chain")
    return (out[:m], following[:m]) if pad else (out, following)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _kernel(a, w, residual, mean, mul, bias, w_next, bias_next, interpret: bool):
    return _pallas(a, w, residual, mean, mul, bias, w_next, bias_next, interpret)


def _kernel_fwd(*args):
    return _kernel(*args), args[:8]


def _kernel_bwd(interpret, operands, cotangents):
    """The plain computation's derivative (autodiff of :func:`reference`)."""
    return jax.vjp(reference, *operands)[1](cotangents)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def matmul_chain(a, w, residual, mean, mul, bias, w_next, bias_next, *,
                 impl: str = "auto"):
    """``(out, next)``: ``out = relu(a) @ w + residual`` and ``next = relu(relu((out - mean)
    * mul + bias) @ w_next + bias_next)`` over the last axis of ``a`` (any leading axes:
    NHWC activations), in ``a``'s dtype, as one kernel (module docstring). ``a`` (..., K):
    in the model activated already (conv3's BatchNorm folded before it), so its ReLU, which
    the 1x1 kernel applies with an identity map, changes nothing; ``w`` (K, N);
    ``residual`` (..., N); ``mean``, ``mul``, ``bias``: (N,) float32, the next BatchNorm's
    map (``mul = scale / sqrt(var + eps)``); ``w_next`` (N, N2); ``bias_next`` (N2,)
    float32. ValueError for shapes that do not fit."""
    kernel_impl.check("matmul_chain", impl)
    lead, n = a.shape[:-1], w.shape[-1]
    if residual.shape != (*lead, n):
        raise ValueError(f"matmul_chain: residual must be {(*lead, n)} (a {a.shape} times "
                         f"w {w.shape}), got {residual.shape}")
    args = (a.reshape(-1, a.shape[-1]), w, residual.reshape(-1, n), mean, mul, bias, w_next,
            bias_next)
    shape = _check(*args)
    if impl == "xla" or (impl == "auto" and not chain_fits(*shape[1:])):
        out, following = reference(*args)
    else:
        compute = functools.partial(
            kernel_impl.dispatch, impl,
            lambda *xs: _kernel(*xs, impl == "interpret"), reference)
        axes = pw.row_axes(args[0].shape[0])
        if axes:  # each device its own rows (the rows of a, residual and both outputs)
            split = (True, False, True, False, False, False, False, False)

            def local(*xs):  # on_own_rows' (out, sums, rows) form: no sums
                out, following = compute(*xs)
                return out, None, following

            out, _, following = pw.on_own_rows(local, axes, split, return_input=True)(*args)
        else:
            out, following = compute(*args)
    return out.reshape(*lead, n), following.reshape(*lead, w_next.shape[-1])
