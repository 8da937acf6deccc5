"""The fused 3x3 convolution (models/conv3x3.py): the kernel (interpreted by Pallas on the
CPU) against an independent float64 computation, its derivative, vmap and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import models, sweep
from mcu_jax.models import conv3x3


def _operands(b, h, w, k, n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, h, w, k)).astype(dtype), rng.normal(size=k).astype(np.float32),
            rng.uniform(0.5, 2.0, size=k).astype(np.float32),
            rng.normal(size=k).astype(np.float32),
            (rng.normal(size=(3, 3, k, n)) / np.sqrt(9 * k)).astype(np.float32))


def _numpy(z, mean, mul, bias, w):
    """float64 numpy: the activation zero-padded, then the nine taps summed by loops."""
    a = np.maximum((z.astype(np.float64) - mean) * mul + bias, 0.0)
    b, h, width, _ = a.shape
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(padded[:, dy:dy + h, dx:dx + width] @ w[dy, dx].astype(np.float64)
              for dy in range(3) for dx in range(3))
    return out, out.sum((0, 1, 2)), (out * out).sum((0, 1, 2))


@pytest.mark.parametrize("b,h,w,k,n", [(3, 8, 6, 16, 32), (2, 5, 7, 32, 16), (1, 4, 4, 64, 64)])
def test_kernel_equals_an_independent_computation(b, h, w, k, n):
    """Interpreted, the kernel gives the padded convolution of relu(bn(z)) and its channel
    sums: with pixels of one image in two programs and programs spanning two images (8 x 6,
    5 x 7), with the last block part empty (70 and 16 pixels in blocks of 128 and 64)."""
    z, mean, mul, bias, wt = _operands(b, h, w, k, n)
    out, (s1, s2) = conv3x3.bn_relu_conv3x3(z, mean, mul, bias, wt, stats=True,
                                            impl="interpret")
    want, w1, w2 = _numpy(z, mean, mul, bias, wt)
    assert out.shape == (b, h, w, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s1, w1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(s2, w2, rtol=1e-4, atol=1e-3)
    plain, none = conv3x3.bn_relu_conv3x3(z, mean, mul, bias, wt, impl="interpret")
    assert none is None
    np.testing.assert_array_equal(plain, out)


def test_every_impl_gives_the_same_values_in_both_dtypes():
    """The kernel, XLA's ops and "auto" (XLA's on the CPU) agree: float32 to rounding,
    bfloat16 to one bfloat16 rounding of the output (its sums taken from the rounded
    output)."""
    for dtype, tol in ((np.float32, 1e-5), (jnp.bfloat16, 2 ** -7)):
        z, mean, mul, bias, w = _operands(2, 8, 8, 16, 16, dtype=dtype, seed=1)
        results = {impl: conv3x3.bn_relu_conv3x3(z, mean, mul, bias, w, stats=True, impl=impl)
                   for impl in ("interpret", "xla", "auto")}
        np.testing.assert_array_equal(results["auto"][0], results["xla"][0])
        ref, (r1, r2) = results["xla"]
        out, (s1, s2) = results["interpret"]
        assert out.dtype == ref.dtype == jnp.dtype(dtype)
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
        np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=tol * scale)
        np.testing.assert_allclose(s1, r1, rtol=tol, atol=tol * scale * 128)
        np.testing.assert_allclose(s2, r2, rtol=2 * tol, atol=tol * scale ** 2 * 128)


@pytest.mark.parametrize("stats", [True, False])
def test_the_derivative_is_the_plain_computations(stats):
    """Gradients of a loss of the output (and its sums) through the kernel equal those of
    the plain computation (no backward kernel: autodiff of XLA's ops), in every operand."""
    z, mean, mul, bias, w = _operands(2, 6, 6, 16, 16, seed=2)

    def loss(impl):
        def f(*args):
            out, sums = conv3x3.bn_relu_conv3x3(*args, stats=stats, impl=impl)
            extra = 0.0 if sums is None else jnp.sum(sums[0] * 0.1) + jnp.sum(sums[1] * 0.01)
            return jnp.sum(jnp.sin(out)) + extra
        return f

    got = jax.grad(loss("interpret"), argnums=tuple(range(5)))(z, mean, mul, bias, w)
    want = jax.grad(loss("xla"), argnums=tuple(range(5)))(z, mean, mul, bias, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_vmap_over_weights_equals_a_loop():
    """Mapped over several weights and inputs at once (the sweep's vmap over t), the kernel
    gives what it gives one at a time."""
    z, mean, mul, bias, w = _operands(2, 4, 4, 16, 16, seed=3)
    ws = np.stack([w, 2 * w, -w])
    zs = np.stack([z, z + 1, z - 1])

    def one(zi, wi):
        return conv3x3.bn_relu_conv3x3(zi, mean, mul, bias, wi, stats=True, impl="interpret")

    out, sums = jax.vmap(one)(zs, ws)
    for i in range(3):
        o, s = one(zs[i], ws[i])
        np.testing.assert_allclose(out[i], o, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sums[1][i], s[1], rtol=1e-6, atol=1e-5)


def test_bad_input_is_refused_early():
    z, mean, mul, bias, w = _operands(1, 4, 4, 16, 16)
    with pytest.raises(ValueError, match=r"z must be \(B, H, W, K\)"):
        conv3x3.bn_relu_conv3x3(z[0], mean, mul, bias, w)
    with pytest.raises(ValueError, match=r"needs w \(3, 3, 16, N\)"):
        conv3x3.bn_relu_conv3x3(z, mean, mul, bias, w[:1])
    with pytest.raises(ValueError, match="impl must be one of"):
        conv3x3.bn_relu_conv3x3(z, mean, mul, bias, w, impl="cuda")
    z3, mean3, mul3, bias3, w3 = _operands(1, 4, 4, 24, 16)
    with pytest.raises(ValueError, match="powers of two from 16 to 64; got K=24"):
        conv3x3.bn_relu_conv3x3(z3, mean3, mul3, bias3, w3, impl="interpret")
    # "auto" takes any channel count: the plain computation where the kernel does not fit
    out, _ = conv3x3.bn_relu_conv3x3(z3, mean3, mul3, bias3, w3)
    np.testing.assert_allclose(out, _numpy(z3, mean3, mul3, bias3, w3)[0], rtol=1e-4,
                               atol=1e-4)


def test_block_rows_keep_tiles_small():
    assert [conv3x3.block_rows(c, c) for c in (16, 32, 64)] == [128, 128, 64]
    assert conv3x3.kernel_fits(16, 64) and not conv3x3.kernel_fits(128, 128)


def test_the_model_with_the_kernel_computes_the_same():
    """PreResNet with ``conv3x3`` has the same variables (names, shapes, initial values) and
    computes the same train-mode logits and batch statistics, eval-mode logits (also with
    BatchNorm folded: bn3 then folded into a cuDNN conv2 instead) as with the 1x1 kernel
    alone, up to float rounding (depth 11: stage 1's block takes the kernel, the strided
    first blocks of stages 2 and 3 keep cuDNN)."""
    base = models.create("preresnet110", 10, depth=11, pointwise="interpret")
    kernel = models.with_conv3x3(base, "interpret")
    v = models.init_variables(base, jax.random.PRNGKey(0), (1, 16, 16, 3))
    same = models.init_variables(kernel, jax.random.PRNGKey(0), (1, 16, 16, 3))
    jax.tree.map(np.testing.assert_array_equal, same, v)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))

    def run(m):
        trained = m.apply(v, x, train=True, mutable=["batch_stats"])
        return trained, m.apply(v, x, train=False), models.folded(m).apply(v, x, train=False)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 run(kernel), run(base))
    # the kernel runs in stage 1's block, in train mode and in evaluation, not where bn3 is
    # folded into conv2 (cuDNN's convolution with its bias and ReLU)
    for m, train, calls in ((kernel, True, 1), (kernel, False, 1),
                            (models.folded(kernel), False, 0), (base, True, 0)):
        text = str(jax.make_jaxpr(lambda v, m=m, t=train: m.apply(
            v, x, train=t, mutable=["batch_stats"] if t else False))(v))
        assert len(re.findall(r"\bname=bn_relu_conv3x3\b", text)) == calls, (m.conv3x3, train)


def test_the_kernel_needs_the_1x1_kernel():
    base = models.create("preresnet110", 10, depth=11)
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        models.with_conv3x3(base, "fused")
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        models.init_variables(base.clone(conv3x3="fused"), jax.random.PRNGKey(0),
                              (1, 8, 8, 3))
    with pytest.raises(ValueError, match="conv3x3 must be one of"):
        models.with_conv3x3(base, "cudnn")
    assert models.with_conv3x3(base, "conv").conv3x3 == "conv"  # nothing to need
    cnn = models.create("cnn_small", 10)
    assert models.with_conv3x3(cnn, "fused") is cnn  # no such field: unchanged


def test_sweep_with_the_kernel_measures_the_same(digits_images, digits_split):
    """``conv3x3`` changes how the sweep computes, not what: the same accuracies and (up to
    float rounding) the same probabilities and BatchNorm statistics at every t, with the
    kernel interpreted under vmap over t, BatchNorm batches two at once and a remainder."""
    train_images, test_images = digits_images
    model = models.create("preresnet110", 10, depth=11)
    points = [models.init_variables(model, jax.random.PRNGKey(i), (8, 8, 1))["params"]
              for i in range(3)]
    template = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))["batch_stats"]
    args = (model, points, np.array([0.0, 0.6]), template,
            (train_images, digits_split.retain[:300]),
            {"t": (test_images, digits_split.test)})
    options = dict(return_probs=True, return_stats=True, bn_batch_size=128, strategy="vmap",
                   bn_group=2, pointwise="interpret")
    plain = sweep.sweep(*args, **options)
    kernel = sweep.sweep(*args, **options, conv3x3="interpret")
    for name in plain.acc:
        np.testing.assert_allclose(kernel.acc[name], plain.acc[name], atol=1e-4)
        np.testing.assert_allclose(kernel.probs[name], plain.probs[name], rtol=1e-3,
                                   atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 kernel.batch_stats, plain.batch_stats)
    with pytest.raises(ValueError, match="needs pointwise"):
        sweep.sweep(*args, **{**options, "pointwise": "conv"}, conv3x3="fused")
