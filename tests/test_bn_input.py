"""A train-mode BatchNorm formed from its input's sums by a kernel's op (models/bn_input.py):
the finishing kernel (interpreted by Pallas on the CPU) against plain sums and autodiff, and
the 1x1 and 3x3 kernels' ops against autodiff of the composed computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import equations, kernel_calls

from mcu_jax.models import batchnorm, bn_input, conv3x3
from mcu_jax.models import pointwise as pw


@pytest.mark.parametrize("p,shape", [(8, (16, 32)), (6, (3, 3, 16, 16)), (1, None), (5, (16,)),
                                     (100, (16, 64))])
def test_finish_adds_up_the_shares_and_takes_them_through_the_coefficients(p, shape):
    """The kernel's totals equal numpy's sums of the programs' shares (P a power of two or
    not, one row, a weight gradient of the 3x3 kernel's shape, none), and its sums' and
    scale's cotangents equal autodiff of ``batch_coefficients`` (through mean and mul, the
    offset's cotangent entering as ``-mul d_offset`` on the mean), as XLA's path computes
    them."""
    rng = np.random.default_rng(0)
    k, n, eps = 16, 50, 1e-5
    sums = rng.normal(size=(p, 2, k)).astype(np.float32)
    d_w = None if shape is None else rng.normal(size=(p, *shape)).astype(np.float32)
    x = rng.normal(size=(n, k)).astype(np.float32)
    total, total_sq = x.sum(0), (x * x).sum(0)
    scale = rng.uniform(0.5, 2.0, k).astype(np.float32)
    mean, var, mul, raw = bn_input.coefficients(total, total_sq, scale, n, eps)
    (_, _, mul_), vjp = jax.vjp(lambda s, q: batchnorm.batch_coefficients(s, q, scale, n, eps),
                                total, total_sq)
    pair = sums.sum(0)
    want = vjp((-mul_ * pair[0], jnp.zeros(k), pair[1]))
    d_scale = jax.vjp(lambda s: batchnorm.batch_coefficients(total, total_sq, s, n, eps)[2],
                      scale)[1](pair[1] * np.ones(k, np.float32))[0]
    for impl in ("xla", "interpret"):
        d_sum, d_sq, d_bias, got_scale, got_w = bn_input.finish(
            jnp.asarray(sums), d_w, mean, raw, mul, n, eps, impl)
        np.testing.assert_allclose(d_bias, pair[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_scale, d_scale, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_sum, want[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d_sq, want[1], rtol=1e-4, atol=1e-6)
        if d_w is None:
            assert got_w is None
        else:
            assert got_w.shape == shape
            np.testing.assert_allclose(got_w, d_w.sum(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be"):
        bn_input.finish(jnp.asarray(sums), d_w, mean, raw, mul, n, eps, "cuda")


def test_finish_blocks_divide_the_widths_and_rows():
    """Each program's columns divide the width and its rows' steps divide P, within the
    sizes the docstring names."""
    for p in (1, 6, 32, 100, 256, 1024, 40000):
        for width in (16, 1024, 9 * 256, 64 * 256):
            block, chunk = bn_input.finish_blocks(p, width)
            assert width % block == 0 and p % chunk == 0 and block & (block - 1) == 0
            assert block <= 1024 and chunk * block <= 4096
            assert p * block <= 16384 or block == 16


def _bn_operands(m, k, seed):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(m, k)) * 2 + 1).astype(np.float32)
    return (jnp.asarray(z), jnp.asarray(rng.uniform(0.5, 2.0, k).astype(np.float32)),
            jnp.asarray(rng.normal(size=k).astype(np.float32)))


def _gradients(loss, args, argnums):
    """The gradients of ``loss(impl, *args)`` in ``argnums`` for XLA's ops and the
    interpreted kernels."""
    return {impl: jax.grad(functools.partial(loss, impl), argnums=argnums)(*args)
            for impl in ("xla", "interpret")}


def _with_use(loss, use, impl, *args):
    return loss(impl, *args, use=use)


def _close(grads, rtol=2e-4):
    for got, want in zip(grads["interpret"], grads["xla"], strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def test_the_1x1_op_from_sums_has_autodiffs_gradients():
    """``bn_relu_matmul_from_sums`` with the kernels: the same values as composed and the
    gradients of every operand (z through its sums too, the scale, the bias, the weight, the
    residual, the returned input; with and without a loss of the batch statistics it
    returns), all at once or a few at a time, equal autodiff of the
    coefficients and XLA's ops; the backward pass runs the finishing kernel once and no
    other reduction of the backward kernel's shares (its weight gradient's and sums' shares
    go to it unreduced)."""
    z, scale, bias = _bn_operands(300, 32, seed=1)
    rng = np.random.default_rng(2)
    w = jnp.asarray((rng.normal(size=(32, 16)) / 6).astype(np.float32))
    res = jnp.asarray(rng.normal(size=(300, 16)).astype(np.float32))

    def loss(impl, z, scale, bias, w, res, use=(0.0, 0.0)):
        out, (mean, var), sums, z_back = pw.bn_relu_matmul_from_sums(
            z, batchnorm.statistics_sums(z), scale, bias, w, res, epsilon=1e-5, stats=True,
            return_input=True, impl=impl)
        return (jnp.sum(out ** 2) + 0.3 * jnp.sum(sums[0]) + 0.01 * jnp.sum(sums[1])
                + 0.5 * jnp.sum(z_back) + use[0] * jnp.sum(mean) + use[1] * jnp.sum(var))

    args = (z, scale, bias, w, res)
    for use in ((0.0, 0.0), (0.2, 0.1)):  # the batch statistics' cotangents zero or not
        of = functools.partial(_with_use, loss, use)
        np.testing.assert_allclose(of("interpret", *args), of("xla", *args), rtol=1e-5)
        for argnums in ((0, 1, 2, 3, 4), (1, 2), (3,), (0,)):
            _close(_gradients(of, args, argnums))
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret"),
                                    argnums=(0, 1, 2, 3, 4)))(*args)
    assert len(kernel_calls(jaxpr, "bn_finish")) == 1
    (backward,) = kernel_calls(jaxpr, "bn_relu_matmul_backward")
    (finish,) = kernel_calls(jaxpr, "bn_finish")
    shares = backward.outvars[1:3]
    assert [tuple(v.aval.shape)[1:] for v in shares] == [(32, 16), (2, 32)]
    readers = [e for e in equations(jaxpr.jaxpr) if set(map(id, e.invars)) & set(map(id, shares))]
    assert all(e.primitive.name in ("reshape", "pjit") for e in readers), readers


def test_the_3x3_op_from_sums_has_autodiffs_gradients():
    """``bn_relu_conv3x3_from_sums`` with the kernels, as the 1x1 op: values, gradients of
    every operand and of a few, one finishing kernel in the backward pass (adding up the
    nine taps' weight gradients beside bn2's sums)."""
    z, scale, bias = _bn_operands(2 * 8 * 8, 16, seed=3)
    z = z.reshape(2, 8, 8, 16)
    w = jnp.asarray((np.random.default_rng(4).normal(size=(3, 3, 16, 16)) / 12)
                    .astype(np.float32))

    def loss(impl, z, scale, bias, w):
        out, (mean, var), sums = conv3x3.bn_relu_conv3x3_from_sums(
            z, batchnorm.statistics_sums(z), scale, bias, w, epsilon=1e-5, stats=True,
            impl=impl)
        return (jnp.sum(out ** 2) + 0.3 * jnp.sum(sums[0]) + 0.01 * jnp.sum(sums[1])
                + 0.2 * jnp.sum(mean) + 0.1 * jnp.sum(var))

    args = (z, scale, bias, w)
    np.testing.assert_allclose(loss("interpret", *args), loss("xla", *args), rtol=1e-5)
    for argnums in ((0, 1, 2, 3), (1,), (3,)):
        _close(_gradients(loss, args, argnums))
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, "interpret"),
                                    argnums=(0, 1, 2, 3)))(*args)
    (finish,) = kernel_calls(jaxpr, "bn_finish")
    assert tuple(finish.outvars[4].aval.shape) == (9 * 16 * 16,)


def test_ops_from_sums_refuse_bad_input():
    """A scale of another shape than the bias, an unknown impl, the XLA backward asked for
    kernel shares, or ``apply`` asked to choose its impl, is refused up front."""
    z, scale, bias = _bn_operands(64, 16, seed=5)
    w = jnp.zeros((16, 16))
    sums = batchnorm.statistics_sums(z)
    with pytest.raises(ValueError, match="scale must be"):
        pw.bn_relu_matmul_from_sums(z, sums, scale[:8], bias, w, epsilon=1e-5)
    with pytest.raises(ValueError, match="impl must be"):
        pw.bn_relu_matmul_from_sums(z, sums, scale, bias, w, epsilon=1e-5, impl="cuda")
    with pytest.raises(ValueError, match="impl 'xla' has none"):
        pw.backward(z, *sums, bias, w, None, None, z @ w, (z @ w, None), False, False,
                    impl="xla", partials=True)
    with pytest.raises(ValueError, match="impl must be 'xla', 'pallas' or 'interpret'"):
        bn_input.apply(None, (), 1e-5, z, sums, scale, bias, impl="auto")
    with pytest.raises(ValueError, match="scale must be"):
        conv3x3.bn_relu_conv3x3_from_sums(z.reshape(1, 8, 8, 16), sums, scale[:8], bias,
                                          jnp.zeros((3, 3, 16, 16)), epsilon=1e-5)


def test_coefficients_of_the_shares_are_batch_coefficients():
    """The kernel adds up the shares (P not a power of two, channels in several programs)
    and forms what XLA's path and ``batch_coefficients`` form, with the shift the kernels
    apply."""
    rng = np.random.default_rng(6)
    p, k, n, eps = 600, 64, 500, 1e-5  # 4 programs of 16 channels
    partials = rng.normal(size=(p, 2, k)).astype(np.float32)
    partials[:, 1] = np.abs(partials[:, 1]) * 5  # sums of squares: a positive variance
    partials[:, 1, 3] = 0.0  # a variance clipped at zero
    scale = rng.uniform(0.5, 2.0, k).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32)
    mean, var, mul = batchnorm.batch_coefficients(*partials.sum(0), scale, n, eps)
    for impl in ("xla", "interpret"):
        got = bn_input.coefficients_of(jnp.asarray(partials), scale, bias, n, eps, impl)
        want = (mean, var, mul, bias - mean * mul,
                partials.sum(0)[1] / n - (partials.sum(0)[0] / n) ** 2)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="impl must be"):
        bn_input.coefficients_of(jnp.asarray(partials), scale, bias, n, eps, "cuda")
    for q, c in ((q, c) for q in (1, 6, 100, 1024, 40000) for c in (16, 64, 256)):
        block, chunk = bn_input.coefficient_blocks(q, c)
        assert c % block == 0 and q % chunk == 0 and block >= 16 and chunk * block <= 4096


def test_sums_as_shares_carry_the_derivative():
    """``Sums``: ``totals`` adds up the shares and is differentiated through ``total`` and
    ``total_sq`` alone; ``as_partials`` puts whole sums into that form (the same totals
    and derivative)."""
    total, total_sq = jnp.arange(4.0), jnp.arange(4.0) ** 2 + 1
    sums = bn_input.as_partials(total, total_sq, 3)
    assert sums.partials.shape == (3, 2, 4)
    np.testing.assert_array_equal(sums.total, 0.0)
    for got, want in zip(batchnorm.totals(sums), (total, total_sq), strict=True):
        np.testing.assert_array_equal(got, want)
    grads = jax.grad(lambda s, q: jnp.sum(jnp.stack(batchnorm.totals(
        bn_input.as_partials(s, q, 3))) * jnp.array([[1.0], [2.0]])), argnums=(0, 1))(
        total, total_sq)
    np.testing.assert_array_equal(grads[0], 1.0)
    np.testing.assert_array_equal(grads[1], 2.0)
    assert batchnorm.totals((total, total_sq)) == (total, total_sq)


def test_a_block_of_kernels_hands_on_the_shares():
    """conv1's op hands its output's sums to the 3x3 op as its programs' shares, and that op
    to conv3's (``shares``): each forms its coefficients in one kernel that adds them up
    (``bn_coefficients``), and the chain has the values and gradients of XLA's ops, with
    "auto" on the CPU (XLA's ops, the sums in the shares' form) too."""
    rng = np.random.default_rng(7)
    z, s1, b1 = _bn_operands(2 * 8 * 8, 64, seed=8)
    w1 = jnp.asarray((rng.normal(size=(64, 16)) / 8).astype(np.float32))
    w2 = jnp.asarray((rng.normal(size=(3, 3, 16, 16)) / 12).astype(np.float32))
    w3 = jnp.asarray((rng.normal(size=(16, 64)) / 4).astype(np.float32))
    s2, b2, s3, b3 = (jnp.asarray(v) for v in rng.uniform(0.5, 1.5, (4, 16)).astype(np.float32))

    def loss(impl, z, s1, b1, w1, s2, b2, w2, s3, b3, w3):
        out1, _, sums1, z_back = pw.bn_relu_matmul_from_sums(
            z, batchnorm.statistics_sums(z), s1, b1, w1, epsilon=1e-5, stats=True,
            return_input=True, shares=True, impl=impl)
        out2, _, sums2 = conv3x3.bn_relu_conv3x3_from_sums(
            out1.reshape(2, 8, 8, 16), sums1, s2, b2, w2, epsilon=1e-5, stats=True,
            shares=True, impl=impl)
        out3, _, sums3 = pw.bn_relu_matmul_from_sums(
            out2.reshape(-1, 16), sums2, s3, b3, w3, z_back, epsilon=1e-5, stats=True,
            shares=True, impl=impl)
        total, total_sq = batchnorm.totals(sums3)
        return jnp.sum(out3 ** 2) + 0.1 * jnp.sum(total) + 0.01 * jnp.sum(total_sq)

    args = (z, s1, b1, w1, s2, b2, w2, s3, b3, w3)
    grads = {impl: jax.grad(functools.partial(loss, impl), argnums=tuple(range(10)))(*args)
             for impl in ("xla", "interpret", "auto")}
    np.testing.assert_allclose(loss("interpret", *args), loss("xla", *args), rtol=1e-5)
    _close(grads, rtol=5e-4)
    _close({"interpret": grads["auto"], "xla": grads["xla"]}, rtol=1e-5)
    jaxpr = jax.make_jaxpr(functools.partial(loss, "interpret"))(*args)
    assert len(kernel_calls(jaxpr, "bn_coefficients")) == 2  # bn2's and bn3's
