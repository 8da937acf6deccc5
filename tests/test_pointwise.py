"""The fused 1x1 convolution (models/pointwise.py) and PreResNet's ``pointwise`` setting: the
kernel (interpreted by Pallas on the CPU) against an independent computation, and the model
with it against the model without it."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import kernel_calls

from mcu_jax import models, runs, sweep
from mcu_jax.models import batchnorm
from mcu_jax.models import pointwise as pw
from mcu_jax.models.batchnorm import BatchNormApplied, BatchNormCoefficients
from mcu_jax.pipeline import SelectionConfig


def _operands(m, k, n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(m, k)).astype(dtype), rng.normal(size=k).astype(np.float32),
            rng.uniform(0.5, 2.0, size=k).astype(np.float32),
            rng.normal(size=k).astype(np.float32),
            (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32),
            rng.normal(size=(m, n)).astype(dtype))


def _numpy(z, mean, mul, bias, w, residual):
    """float64 numpy: relu(bn(z)) @ w + residual, and the output's channel sums."""
    a = np.maximum((z.astype(np.float64) - mean) * mul + bias, 0.0)
    out = a @ w.astype(np.float64) + residual
    return out, out.sum(0), (out * out).sum(0)


@pytest.mark.parametrize("m,k,n", [(200, 16, 16), (96, 64, 32), (130, 32, 128)])
def test_kernel_equals_an_independent_computation(m, k, n):
    """Interpreted, the kernel gives relu(bn(z)) @ w + residual and its channel sums, also when
    the rows do not fill the last block (200, 130 rows) and with several blocks of output
    channels (128 > 64)."""
    z, mean, mul, bias, w, residual = _operands(m, k, n)
    out, (s1, s2) = pw.bn_relu_matmul(z, mean, mul, bias, w, residual, stats=True,
                                      impl="interpret")
    want, w1, w2 = _numpy(z, mean, mul, bias, w, residual)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s1, w1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(s2, w2, rtol=1e-4, atol=1e-3)
    plain, none = pw.bn_relu_matmul(z, mean, mul, bias, w, impl="interpret")
    assert none is None  # no statistics, no residual
    np.testing.assert_allclose(plain, want - residual, rtol=1e-4, atol=1e-4)
    # An output bias and ReLU (a following BatchNorm folded in), every block of channels its
    # own part of the bias
    out_bias = np.linspace(-1.0, 1.0, n).astype(np.float32)
    folded, _ = pw.bn_relu_matmul(z, mean, mul, bias, w, residual, out_bias=out_bias,
                                  out_relu=True, impl="interpret")
    np.testing.assert_allclose(folded, np.maximum(want + out_bias, 0.0), rtol=1e-4, atol=1e-4)


def test_every_impl_gives_the_same_values_and_gradients():
    """"xla" and the interpreted kernel agree on an NHWC activation (float32 and bfloat16),
    and the kernel's gradient (its custom VJP) is that of the plain computation."""
    z, mean, mul, bias, w, _ = _operands(2 * 6 * 6, 32, 16, seed=1)
    z = z.reshape(2, 6, 6, 32)
    residual = np.ones((2, 6, 6, 16), np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        zd, rd = z.astype(dtype), residual.astype(dtype)
        a, sa = pw.bn_relu_matmul(zd, mean, mul, bias, w, rd, stats=True, impl="xla")
        b, sb = pw.bn_relu_matmul(zd, mean, mul, bias, w, rd, stats=True, impl="interpret")
        assert a.shape == b.shape == (2, 6, 6, 16) and a.dtype == b.dtype == dtype
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
        np.testing.assert_allclose(sa, sb, rtol=tol)

    def loss(impl, *args):
        out, (s1, s2) = pw.bn_relu_matmul(*args, residual, stats=True, impl=impl)
        return jnp.sum(out ** 2) + jnp.sum(s1) + 1e-3 * jnp.sum(s2)

    args = (z, mean, mul, bias, w)
    want = jax.grad(loss, argnums=(1, 2, 3, 4, 5))("xla", *args)
    got = jax.grad(loss, argnums=(1, 2, 3, 4, 5))("interpret", *args)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_written_out_derivative_is_autodiffs(dtype, impl):
    """``pointwise.backward`` (the kernel's VJP, which keeps the forward pass's output rather
    than recomputing the product) gives autodiff's cotangents of the plain computation for
    every combination of statistics, residual (of z's dtype or float32), output bias and
    output ReLU, with another cotangent of z added (``return_input``'s): in XLA and with the
    backward kernel (interpreted), which adds the statistics' part itself or leaves it to
    XLA where it must (an output ReLU, the output bias's gradient, a float32 residual)."""
    z, mean, mul, bias, w, residual = _operands(40, 32, 16, seed=2)
    z = z.astype(dtype)
    residuals = (None, residual.astype(dtype), residual)
    out_bias = np.linspace(-1.0, 1.0, 16).astype(np.float32)
    rng = np.random.default_rng(3)
    d_out = rng.normal(size=(40, 16)).astype(dtype)
    d_sums = tuple(rng.normal(size=16).astype(np.float32) for _ in range(2))
    d_input = rng.normal(size=z.shape).astype(dtype)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    for stats, out_relu, r, ob in itertools.product((False, True), (False, True), residuals,
                                                     (False, True)):
        args = (z, mean, mul, bias, w, r, out_bias if ob else None)
        plain = functools.partial(pw.reference, stats=stats, out_relu=out_relu)
        (out, _), vjp = jax.vjp(plain, *args)
        cotangents = (d_out, d_sums if stats else None)
        got = pw.backward(*args, out, cotangents, stats, out_relu, impl=impl, d_input=d_input)
        want = list(vjp(cotangents))
        want[0] = (want[0].astype(jnp.float32) + d_input.astype(jnp.float32)).astype(dtype)
        for g, h in zip(got, want, strict=True):
            assert (g is None) == (h is None)
            if g is not None:
                assert g.dtype == h.dtype and g.shape == h.shape
                scale = float(np.max(np.abs(np.asarray(h, np.float32)))) + 1.0
                np.testing.assert_allclose(np.asarray(g, np.float32),
                                           np.asarray(h, np.float32), rtol=tol,
                                           atol=tol * scale)


@pytest.mark.parametrize("m,k,n", [(33000, 16, 16), (300, 256, 64)])
def test_backward_kernel_is_the_written_out_derivative(m, k, n):
    """The backward kernel (interpreted) gives :func:`pointwise.backward`'s XLA result, with
    several loop steps per program and padded rows (33,000 rows of 16 channels: 256-row
    programs, 128 rows a step; 300 rows of 256: 256-row programs, 32 rows a step), and with
    several blocks of input channels (256 = 2 x 128), the residual's cotangent written by
    one of them; with another cotangent of the input added (``d_input``)."""
    assert pw.backward_blocks(33000, 16, 16) == (128, 16, 256)
    assert pw.backward_blocks(300, 256, 64) == (32, 128, 256)
    assert pw.backward_blocks(300, 256, 64, wide=True) == (16, 128, 256)
    assert pw.blocks(256, 64) == (16, 32) and pw.blocks(64, 256) == (128, 64)
    for dtype in (jnp.float32, jnp.bfloat16):
        z, mean, mul, bias, w, residual = _operands(m, k, n, dtype, seed=4)
        args = (z, mean, mul, bias, w, residual, None)
        out, _ = pw.reference(*args, stats=True)
        rng = np.random.default_rng(5)
        cotangents = (rng.normal(size=(m, n)).astype(dtype),
                      tuple(rng.normal(size=n).astype(np.float32) for _ in range(2)))
        d_input = rng.normal(size=(m, k)).astype(dtype)  # the returned input's cotangent
        want = pw.backward(*args, out, cotangents, True, False, d_input=d_input)
        got = pw.backward(*args, out, cotangents, True, False, impl="interpret",
                          d_input=d_input)
        for g, h in zip(got[:6], want[:6], strict=True):  # z, mean, mul, bias, w, residual
            assert g.dtype == h.dtype and g.shape == h.shape
            scale = float(np.max(np.abs(np.asarray(h, np.float32)))) + 1.0
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                                       rtol=1e-4, atol=1e-5 * scale)


def test_the_kernel_derives_only_what_is_differentiated():
    """With some operands not differentiated (a frozen weight, say), the kernel's VJP gives
    autodiff's gradients for the others, and its backward kernel neither computes nor writes
    the cotangents nobody wants: three outputs with z's and w's, two with one of them."""
    z, mean, mul, bias, w, residual = _operands(300, 32, 16, seed=6)
    args = (z, mean, mul, bias, w)

    def loss(impl, *a, stats=True):
        out, sums = pw.bn_relu_matmul(*a, residual, stats=stats, impl=impl)
        return jnp.sum(out ** 2) + (jnp.sum(sums[0]) if stats else 0.0)

    for argnums in ((0,), (4,), (1, 2, 3), (0, 4)):
        for stats in (False, True):
            got = jax.grad(functools.partial(loss, "interpret", stats=stats),
                           argnums=argnums)(*args)
            want = jax.grad(functools.partial(loss, "xla", stats=stats), argnums=argnums)(*args)
            for g, h in zip(got, want, strict=True):
                np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)
        program = str(jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret"),
                                              argnums=argnums))(*args))
        backward_call = [line for line in program.splitlines() if "pallas_call[" in line][-1]
        outputs = backward_call.split("=")[0].split()
        assert len(outputs) == 1 + (0 in argnums) + (4 in argnums)  # sums, d_z?, d_w?


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_returned_input_takes_its_cotangent_into_the_kernel(dtype):
    """With ``return_input`` the kernel returns z as a third result. A loss that uses it (as a
    block's shortcut does), the output, its residual and its statistics gets autodiff's
    gradients of the plain computation, and the backward kernel takes the returned input's
    cotangent and the statistics' part as operands (added as it reads and writes) instead
    of XLA adding them in passes of their own."""
    z, mean, mul, bias, w, residual = _operands(300, 32, 16, dtype, seed=7)
    probe = np.random.default_rng(8).normal(size=z.shape).astype(np.float32)

    def loss(impl, *a):
        out, (s1, s2), same = pw.bn_relu_matmul(*a, stats=True, return_input=True, impl=impl)
        assert same.shape == z.shape and same.dtype == z.dtype
        return (jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(s1) + 1e-3 * jnp.sum(s2)
                + jnp.sum(same.astype(jnp.float32) * probe))

    args = (z, mean, mul, bias, w, residual)
    _, _, same = pw.bn_relu_matmul(*args, return_input=True, impl="interpret")
    assert np.array_equal(np.asarray(same), np.asarray(z))
    argnums = (0, 1, 2, 3, 4, 5)
    want = jax.grad(functools.partial(loss, "xla"), argnums=argnums)(*args)
    got = jax.grad(functools.partial(loss, "interpret"), argnums=argnums)(*args)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    for g, h in zip(got, want, strict=True):
        assert g.dtype == h.dtype
        scale = float(np.max(np.abs(np.asarray(h, np.float32)))) + 1.0
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                                   rtol=tol, atol=tol * scale)
    program = jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret"),
                                      argnums=argnums))(*args)
    (call,) = _backward_calls(program)
    # z, mean, mul, shift, w, d_out; out; the returned input's cotangent; d_sum, d_squares
    assert len(call.invars) == 10
    assert len(call.outvars) == 4  # d_z, d_w's and the sums' partial sums, the residual's


def _numpy_bn(z, mean, mul, bias, w, scale, offset, eps=1e-5):
    """float64 numpy: relu(bn2(relu(bn(z)) @ w)) with bn2 on the product's batch statistics."""
    out, s1, s2 = _numpy(z, mean, mul, bias, w, 0.0)
    mean2 = s1 / len(out)
    var2 = s2 / len(out) - mean2 ** 2
    return np.maximum((out - mean2) / np.sqrt(var2 + eps) * scale + offset, 0.0), mean2, var2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_following_batchnorm_is_derived_in_the_kernel(dtype):
    """``bn_relu_matmul_bn`` (a PreResNet block's conv1 with bn2 + ReLU after it, in train
    mode) gives relu(bn2(out)) and out's batch statistics, and, with the kernels
    (interpreted), autodiff's gradients of the composed computation for every operand:
    with padding rows, with the returned input's cotangent and with cotangents of the
    output and the statistics, of the output only (the models' case) or of the statistics
    only. The backward kernel takes bn2's output cotangent and coefficients as operands;
    without any of the kernel's own operands to differentiate it does not run."""
    m, k, n = 300, 32, 16
    z, mean, mul, bias, w, _ = _operands(m, k, n, seed=11)
    rng = np.random.default_rng(12)
    scale = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    offset = (0.3 * rng.normal(size=n)).astype(np.float32)
    args = (z.astype(dtype), mean, mul, bias, w, scale, offset)
    a, (mean2, var2) = pw.bn_relu_matmul_bn(*args, 1e-5, impl="interpret")
    want = _numpy_bn(z, mean, mul, bias, w, scale, offset)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    for got, expected in zip((a, mean2, var2), want, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=tol,
                                   atol=tol * (1 + np.max(np.abs(expected))))
    probes = [rng.normal(size=shape).astype(np.float32) for shape in ((m, n), (m, k))]

    def loss(impl, parts, *operands):
        y, (mu, var), same = pw.bn_relu_matmul_bn(*operands, 1e-5, return_input=True,
                                                  impl=impl)
        value = jnp.sum(same.astype(jnp.float32) * probes[1])
        if "output" in parts:
            value += jnp.sum(y.astype(jnp.float32) * probes[0])
        if "mean" in parts:
            value += jnp.sum(mu * 0.3)
        if "var" in parts:
            value += jnp.sum(var * 0.1)
        return value

    argnums = tuple(range(7))
    for parts in (("output", "mean", "var"), ("output",), ("mean", "var"), ("output", "mean"),
                  ("output", "var")):
        want = jax.grad(functools.partial(loss, "xla", parts), argnums=argnums)(*args)
        got = jax.grad(functools.partial(loss, "interpret", parts), argnums=argnums)(*args)
        for name, g, h in zip(pw.BN_OPERANDS, got, want, strict=True):
            assert g.dtype == h.dtype, name
            scale_h = float(np.max(np.abs(np.asarray(h, np.float32)))) + 1.0
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                                       rtol=tol, atol=tol * scale_h, err_msg=name)
    program = jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret", ("output",)),
                                      argnums=argnums))(*args)
    (call,) = _backward_calls(program)
    # z, mean, mul, shift, w, bn2's output cotangent; out, the returned input's cotangent,
    # bn2's mul and shift; and what the kernel derives the sums' cotangents from: the
    # product's sums, bn2's two gradient sums (each pair one array) and mul; no d_sum or
    # d_squares formed outside
    shapes = [tuple(v.aval.shape) for v in call.invars[6:]]
    assert shapes == [(512, n), (512, k), (n,), (n,), (2, n), (2 * n,), (n,)]  # padded rows
    with_statistics = jax.make_jaxpr(jax.grad(
        functools.partial(loss, "interpret", ("output", "mean", "var")), argnums=argnums))(*args)
    (call,) = _backward_calls(with_statistics)
    assert [tuple(v.aval.shape) for v in call.invars[13:]] == [(n,), (n,)]  # mean's, var's
    only_w = jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret", ("output",)),
                                     argnums=4))(*args)
    (call,) = _backward_calls(only_w)
    assert len(call.outvars) == 2  # d_w's and the sums' partial sums: no d_z
    only_bn = jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret", ("output",)),
                                      argnums=(5, 6)))(*args)
    assert not _backward_calls(only_bn)


def test_the_sums_cotangents_are_the_coefficients_derivative():
    """``_sums_cotangents`` (what the backward kernel derives the statistics sums'
    cotangents from) equals autodiff of ``batch_coefficients``, with the multiplier in place
    of the scale: with and without cotangents of the returned mean and variance, with a
    channel whose variance is clipped at zero exactly (half the cotangent, as
    ``jnp.maximum`` gives at a tie) and one clipped below it (none); and ``backward`` with
    ``derive`` (its fn given refs in the backward kernel) gives what it gives with those
    cotangents, in XLA and in the kernel, and refuses both at once."""
    rng = np.random.default_rng(21)
    n, c = 40, 16
    x = rng.normal(size=(n, c)).astype(np.float32)
    x[:, 3] = 0.0  # sum and sum of squares 0: the variance's clip at its tie
    sums = (x.sum(0), (x * x).sum(0))
    sums[1][5] = 0.5 * sums[0][5] ** 2 / n  # E[x^2] < E[x]^2: clipped below its tie
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
    (mean, var, mul), vjp = jax.vjp(
        lambda s, q: batchnorm.batch_coefficients(s, q, scale, n, 1e-5), *sums)
    d_offset, d_mul = rng.normal(size=(2, c)).astype(np.float32)
    for d_mean, d_var in ((0.0, 0.0), tuple(rng.normal(size=(2, c)).astype(np.float32))):
        want = vjp((d_mean - mul * d_offset, d_var + np.zeros(c, np.float32), d_mul))
        got = pw._sums_cotangents(jnp.stack(sums), jnp.concatenate([d_offset, d_mul]), mul,
                                  d_mean, d_var, n, 1e-5)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    z, mean1, mul1, bias1, w1, _ = _operands(300, 32, 16, seed=22)
    out, _ = pw.bn_relu_matmul(z, mean1, mul1, bias1, w1, impl="xla")
    d_out = rng.normal(size=out.shape).astype(np.float32)
    # derive's fn reads its operands by indexing: refs in the kernel, arrays in XLA
    stats = jnp.stack(sums)
    pair = jnp.concatenate([d_offset, d_mul])
    given = pw._sums_cotangents(stats, pair, mul, 0.0, 0.0, n, 1e-5)
    want = pw.backward(z, mean1, mul1, bias1, w1, None, None, out, (d_out, given), True,
                       False, impl="xla")
    derive = (pw.StaticPartial(pw._derived_sums_cotangents, (False, False, n, 1e-5)),
              (stats, pair, mul))
    assert hash(derive[0]) == hash(pw.StaticPartial(pw._derived_sums_cotangents,
                                                    (False, False, n, 1e-5)))
    for impl in ("xla", "interpret"):
        got = pw.backward(z, mean1, mul1, bias1, w1, None, None, out, (d_out, None), True,
                          False, impl=impl, derive=derive)
        for g, h in zip(got, want, strict=True):
            assert (g is None) == (h is None)
            if g is not None:
                np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="derive computes"):
        pw.backward(z, mean1, mul1, bias1, w1, None, None, out, (d_out, given), True, False,
                    impl="xla", derive=derive)
    with pytest.raises(ValueError, match="must be a pointwise.StaticPartial, got partial"):
        pw.backward(z, mean1, mul1, bias1, w1, None, None, out, (d_out, None), True, False,
                    impl="xla", derive=(functools.partial(derive[0].func, *derive[0].args),
                                        derive[1]))


def test_the_following_batchnorm_on_the_model_path():
    """Without the kernel ("xla", and "auto" off a GPU) ``bn_relu_matmul_bn`` under
    ``BatchNormApplied`` (PreResNet's conv1 and bn2 in train mode) is, bit for bit, what the
    model computed before: ``bn_relu_matmul`` then ``BatchNormCoefficients``' map, with the
    same running-statistics update. Bad scale or offset shapes are refused."""
    z, mean, mul, bias, w, _ = _operands(2 * 5 * 5, 16, 32, seed=13)
    z = z.reshape(2, 5, 5, 16)
    rng = np.random.default_rng(14)
    scale, offset = rng.uniform(0.5, 1.5, 32).astype(np.float32), rng.normal(size=32)
    bn2 = {"params": {"scale": scale, "bias": offset.astype(np.float32)},
           "batch_stats": {"mean": rng.normal(size=32).astype(np.float32),
                           "var": rng.uniform(0.5, 2.0, 32).astype(np.float32)}}
    out, sums = pw.bn_relu_matmul(z, mean, mul, bias, w, stats=True, impl="xla")
    coefficients, want_stats = BatchNormCoefficients(False, 0.9, 1e-5).apply(
        bn2, out, sums, mutable=["batch_stats"])
    want = pw.bn_relu(out, *coefficients)
    for impl in ("xla", "auto"):
        (got,), stats = BatchNormApplied(0.9, 1e-5).apply(
            bn2, 32, functools.partial(pw.bn_relu_matmul_bn, z, mean, mul, bias, w, impl=impl),
            mutable=["batch_stats"])
        assert got.shape == (2, 5, 5, 32)
        np.testing.assert_array_equal(got, want)
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"scale and offset must be \(32,\)"):
        pw.bn_relu_matmul_bn(z, mean, mul, bias, w, scale[:16], offset, 1e-5, impl="xla")


def _backward_calls(program) -> list:
    """The backward kernel's calls in a closed jaxpr (at any depth)."""
    return kernel_calls(program.jaxpr, "bn_relu_matmul_backward")


def test_bad_operands_are_refused():
    z, mean, mul, bias, w, residual = _operands(8, 16, 16)
    with pytest.raises(ValueError, match="impl"):
        pw.bn_relu_matmul(z, mean, mul, bias, w, impl="triton")
    with pytest.raises(ValueError, match=r"w \(16, N\)"):
        pw.bn_relu_matmul(z, mean, mul, bias, w[:8], impl="xla")
    with pytest.raises(ValueError, match="residual must be"):
        pw.bn_relu_matmul(z, mean, mul, bias, w, residual[:, :8], impl="xla")
    with pytest.raises(ValueError, match="got K=16, N=24"):
        pw.bn_relu_matmul(z, mean, mul, bias, np.ones((16, 24), np.float32), impl="interpret")
    assert pw.kernel_fits(512, 16) and not pw.kernel_fits(1024, 16)  # "auto": plain ops


def test_batchnorm_coefficients_are_what_nn_batchnorm_applies():
    """Same variables as nn.BatchNorm; the affine map it applies in evaluation mode; in train
    mode the same batch statistics and running-statistics update, from x or from sums."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 8)) * 3 + 1
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = bn.init(jax.random.PRNGKey(1), x)
    variables = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.PRNGKey(2), a.shape),
                             variables)  # not the initial ones: scale, bias, mean, var matter
    y, new = bn.apply(variables, x, mutable=["batch_stats"])
    sums = (jnp.sum(x, (0, 1, 2)), jnp.sum(x * x, (0, 1, 2)))
    coefficients = BatchNormCoefficients(False, 0.9, 1e-5)
    assert (jax.tree.map(jnp.shape, coefficients.init(jax.random.PRNGKey(1), x))
            == jax.tree.map(jnp.shape, variables))
    for given in (None, sums):
        (mean, mul, bias), got = coefficients.apply(variables, x, given, mutable=["batch_stats"])
        np.testing.assert_allclose((x - mean) * mul + bias, y, rtol=1e-4, atol=1e-4)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(new), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    evaluation = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
    mean, mul, bias = BatchNormCoefficients(True, 0.9, 1e-5).apply(variables, x)
    np.testing.assert_allclose((x - mean) * mul + bias, evaluation, rtol=1e-5, atol=1e-5)


def test_preresnet_with_the_kernel_is_the_same_model():
    """The same variables at initialisation, and up to float rounding the same logits, batch
    statistics and gradients in both modes, as the model with nn.Conv and nn.BatchNorm (each
    block passes its output's statistics to the next, the last to the final BatchNorm). The
    kernel interpreted; "fused" on the CPU (XLA's ops) in the sweep's test below."""
    base = models.create("preresnet110", 5, depth=11)
    model = models.with_pointwise(base, "interpret")
    assert model.pointwise == "interpret"
    v = models.init_variables(base, jax.random.PRNGKey(0), (1, 8, 8, 3))
    same = models.init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 3))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v, same))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))

    @jax.jit
    def outputs(params):
        """Both models' eval logits, train logits, batch statistics and gradients."""
        def train(m, p):
            return m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                           mutable=["batch_stats"])

        return [(m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=False),
                 *train(m, params),
                 jax.grad(lambda p, m=m: jnp.sum(train(m, p)[0] ** 2))(params))
                for m in (model, base)]

    got, want = outputs(v["params"])
    for i, tol in enumerate((1e-5, 1e-5, 1e-5, 1e-4)):  # eval, train, statistics, gradients
        for a, b in zip(jax.tree.leaves(got[i]), jax.tree.leaves(want[i]), strict=True):
            np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol)
    # Evaluation with BatchNorm folded (bn2 on the kernel's way out, bn3 into conv2), with
    # running statistics that are not the initial ones
    stats = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])
    variables = {"params": v["params"], "batch_stats": stats}
    folded = jax.jit(models.folded(model).apply, static_argnames="train")(variables, x,
                                                                          train=False)
    np.testing.assert_allclose(folded, base.apply(variables, x, train=False), rtol=1e-4,
                               atol=1e-5)


def test_pointwise_settings_are_checked():
    base = models.create("preresnet110", 5, depth=11)
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="pointwise must be one of .* got 'dense'"):
        models.with_pointwise(base, "dense")
    with pytest.raises(ValueError, match="pointwise must be one of .* got 'dense'"):
        base.clone(pointwise="dense").init(jax.random.PRNGKey(0), x, train=False)
    # fused_bn changes nothing with the kernel (its BatchNorms are the kernel's): the same
    # program in both modes
    v = base.init(jax.random.PRNGKey(0), x, train=False)
    for train in (False, True):
        programs = [str(jax.make_jaxpr(functools.partial(
            base.clone(pointwise="fused", fused_bn=fused).apply, train=train,
            mutable=["batch_stats"]))(v, x)) for fused in (False, True)]
        assert programs[0] == programs[1]
    small = models.create("cnn_small", 5)  # no 1x1 convolution: unchanged
    assert models.with_pointwise(small, "fused") is small
    assert models.with_pointwise(models.with_pointwise(base, "fused"), "conv") == base
    # Run folders made before the field existed still match (it is left out at "conv")
    assert "pointwise" not in runs.model_identity(base)
    assert "pointwise = 'fused'" in runs.model_identity(models.with_pointwise(base, "fused"))
    with pytest.raises(ValueError, match="pointwise must be one of .* got 'dense'"):
        SelectionConfig(pointwise="dense")
    assert SelectionConfig(pointwise="fused", fold_bn=True).pointwise == "fused"


def test_pointwise_in_the_problem_and_the_run_records():
    """ProblemConfig.pointwise builds the model with the kernel (PreResNet only, refused for
    other models before any data is loaded); every model accepts "conv"; a record made
    before the field existed still matches the default."""
    from mcu_jax.problem import ProblemConfig, check

    assert models.create("cnn_small", 5, pointwise="conv") == models.create("cnn_small", 5)
    with pytest.raises(ValueError, match="pointwise: model 'cnn_small' has no fused 1x1"):
        ProblemConfig(model="cnn_small", pointwise="fused")
    for bad in ("dense", "interpret"):  # "interpret" is the tests' own setting
        with pytest.raises(ValueError, match=f"pointwise must be one of .* got '{bad}'"):
            ProblemConfig(model="preresnet110", pointwise=bad)
    config = ProblemConfig(model="preresnet110", pointwise="fused")
    check(config)  # the embedded digits data set: builds the model
    from mcu_jax.problem import _parts

    assert _parts(config)[2].pointwise == "fused"
    assert runs.first_difference({"problem": {"dtype": "float32"}},
                                 {"problem": {"dtype": "float32", "pointwise": "conv"}}) is None
    assert runs.first_difference({"problem": {"dtype": "float32"}},
                                 {"problem": {"dtype": "float32", "pointwise": "fused"}})


def test_fused_runs_the_kernel_where_the_program_is_compiled_for_a_gpu():
    """"fused" (impl "auto") traced for a CPU (``jax.default_device``; on an NVIDIA GPU's
    host "auto" picks the kernel while tracing, ``kernel_impl``) lowers to the Triton
    kernel, and its gradient to the backward kernel, for an NVIDIA GPU, and to XLA's own
    ops for the CPU."""
    args = _operands(256, 16, 16)[:5]

    def f(*a):
        return pw.bn_relu_matmul(*a, stats=True, impl="auto")

    def loss(*a):
        out, (s1, s2) = f(*a)
        return jnp.sum(out ** 2) + jnp.sum(s1) + jnp.sum(s2)

    with jax.default_device(jax.devices("cpu")[0]):
        traced = jax.jit(f).trace(*args)
        # and its gradient to the backward kernel
        traced_grad = jax.jit(jax.grad(loss, argnums=(0, 4))).trace(*args)
    for platform, kernel in (("cuda", True), ("cpu", False)):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("bn_relu_matmul" in text and "triton" in text) == kernel, platform
        text = traced_grad.lower(lowering_platforms=(platform,)).as_text()
        assert ("bn_relu_matmul_backward" in text) == kernel, platform


def test_sweep_with_the_kernel_measures_the_same(digits_images, digits_split):
    """``pointwise`` changes how the sweep computes, not what: the same accuracies and (up to
    float rounding) the same probabilities and BatchNorm statistics at every t."""
    train_images, test_images = digits_images
    model = models.create("preresnet110", 10, depth=11)
    points = [models.init_variables(model, jax.random.PRNGKey(i), (8, 8, 1))["params"]
              for i in range(3)]
    template = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))["batch_stats"]
    args = (model, points, np.linspace(0, 1, 3), template,
            (train_images, digits_split.retain[:300]),
            {"f": (train_images, digits_split.forget), "t": (test_images, digits_split.test)})
    options = dict(return_probs=True, return_stats=True, bn_batch_size=128, strategy="map")
    plain = sweep.sweep(*args, **options)
    fused = sweep.sweep(*args, **options, pointwise="fused")
    for name in plain.acc:
        np.testing.assert_allclose(fused.acc[name], plain.acc[name], atol=1e-4)
        np.testing.assert_allclose(fused.probs[name], plain.probs[name], rtol=1e-3, atol=1e-5)
    for a, b in zip(jax.tree.leaves(fused.batch_stats), jax.tree.leaves(plain.batch_stats),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # With BatchNorm folded for evaluation too (bn2 on the kernel's way out, bn3 into conv2)
    folded = sweep.sweep(*args, **options, fold_bn=True, pointwise="fused")
    for name in plain.acc:
        np.testing.assert_allclose(folded.acc[name], plain.acc[name], atol=1e-4)
        np.testing.assert_allclose(folded.probs[name], plain.probs[name], rtol=1e-3, atol=1e-5)
    # The kernel itself (interpreted) under vmap over t, with BatchNorm batches two at once
    # and a remainder batch whose rows fill no whole block
    kernel = sweep.sweep(*args, **{**options, "strategy": "vmap"}, bn_group=2,
                         pointwise="interpret")
    for name in plain.acc:
        np.testing.assert_allclose(kernel.acc[name], plain.acc[name], atol=1e-4)
        np.testing.assert_allclose(kernel.probs[name], plain.probs[name], rtol=1e-3, atol=1e-5)


def test_a_bfloat16_weight_takes_its_gradient_rounded():
    """A weight given in bfloat16 (curve training forms a bfloat16 model's kernels so:
    ``models.kernel_dtypes``) gets the kernel's float32 weight gradient rounded to bfloat16;
    the kernel computes the same output, and every other cotangent is the same."""
    z, mean, mul, bias, w, residual = _operands(96, 32, 64, jnp.bfloat16)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(96, 64)), jnp.float32)

    def grads(w):
        def loss(*args):
            out, _ = pw.bn_relu_matmul(*args, residual, impl="interpret")
            return jnp.sum(out.astype(jnp.float32) * probe)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(z, mean, mul, bias, w)

    (value32, g32), (value16, g16) = grads(w), grads(jnp.asarray(w, jnp.bfloat16))
    assert value32 == value16 and g16[4].dtype == jnp.bfloat16
    np.testing.assert_array_equal(g16[4], g32[4].astype(jnp.bfloat16))
    for a, b in zip(g32[:4], g16[:4], strict=True):
        np.testing.assert_array_equal(a, b)
