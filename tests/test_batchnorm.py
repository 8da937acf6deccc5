"""models/batchnorm.py: BatchNorm (+ ReLU) with a hand-written train-mode backward pass.

Checked against Flax's own ``nn.BatchNorm`` (then ``nn.relu``) differentiated by autodiff:
unfused it is that module bit for bit; fused, the outputs and the gradients
(of x, scale and bias, through the returned statistics too) equal within float rounding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax.models import batchnorm
from mcu_jax.models.batchnorm import BatchNorm, batch_norm_train

C = 6


def _x(dtype=jnp.float32, shape=(8, 5, 5, C), seed=0):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), shape) + 1.0
    return x.astype(dtype)


def _variables(x):
    v = nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(1), x)
    params = {"scale": jnp.linspace(0.5, 1.5, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    stats = {"mean": jnp.linspace(-0.2, 0.2, C), "var": jnp.linspace(0.5, 1.5, C)}
    assert jax.tree.structure(v) == jax.tree.structure({"params": params,
                                                        "batch_stats": stats})
    return params, stats


def _loss_and_grads(module, relu_after: bool, x, params, stats):
    """A loss of the output and of the updated running statistics, its value, the output,
    the new statistics and the gradients in (params, x)."""
    w = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def loss(p, x):
        y, new = module.apply({"params": p, "batch_stats": stats}, x,
                              mutable=["batch_stats"])
        y = nn.relu(y) if relu_after else y
        s = new["batch_stats"]
        value = (jnp.sum(y.astype(jnp.float32) * w) + 3.0 * jnp.sum(s["mean"] * jnp.arange(C))
                 + 2.0 * jnp.sum(s["var"]))
        return value, (y, s)

    (value, (y, new)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, y, new, grads


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unfused_is_flax_bit_for_bit(relu, dtype):
    x = _x(dtype)
    params, stats = _variables(x)
    ref = _loss_and_grads(nn.BatchNorm(use_running_average=False, dtype=dtype), relu, x,
                          params, stats)
    ours = _loss_and_grads(BatchNorm(use_running_average=False, dtype=dtype, relu=relu),
                           False, x, params, stats)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ours), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(8, 5, 5, C), (16, C)])  # maps, and features (no positions)
def test_fused_equals_autodiff(relu, dtype, rtol, shape):
    x = _x(dtype, shape)
    params, stats = _variables(x)
    ref = _loss_and_grads(BatchNorm(use_running_average=False, dtype=dtype, relu=relu), False,
                          x, params, stats)
    ours = _loss_and_grads(BatchNorm(use_running_average=False, dtype=dtype, relu=relu,
                                     fused=True), False, x, params, stats)
    _, y_ref, stats_ref, (dp_ref, dx_ref) = ref
    _, y, new, (dp, dx) = ours
    # The output: the same ops on statistics that differ only by the sums' rounding.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=rtol, atol=rtol)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(stats_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert dx.dtype == x.dtype and all(g.dtype == jnp.float32 for g in jax.tree.leaves(dp))
    scale = float(jnp.max(jnp.abs(dx_ref.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32),
                               rtol=rtol, atol=rtol * scale)
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))


def test_fused_gradient_against_finite_differences():
    """Independent of autodiff: the fused gradient of a scalar loss in x (float64 off, so a
    central difference in float32 with a step that keeps rounding small)."""
    x = _x(shape=(4, 3, 3, 2), seed=3)
    scale, bias = jnp.array([0.7, 1.3]), jnp.array([0.1, -0.2])
    w = jax.random.normal(jax.random.PRNGKey(4), x.shape)

    def loss(x):
        y, mean, var = batch_norm_train(x, scale, bias, 1e-5, True)
        return jnp.sum(y * w) + jnp.sum(mean) + 0.5 * jnp.sum(var)

    g = jax.grad(loss)(x)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        eps = 1e-2
        numeric = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(g * d)), float(numeric), rtol=2e-2, atol=2e-2)


def test_fused_relu_at_exactly_zero_and_a_constant_channel():
    """A constant channel has variance 0 and normalises to 0, so with bias 0 its
    pre-activation is exactly 0: the ReLU passes no gradient there, as nn.relu's."""
    x = _x(shape=(4, 3, 3, C)).at[..., 0].set(2.5)
    params, stats = _variables(x)
    params = {**params, "bias": params["bias"].at[0].set(0.0)}
    ref = _loss_and_grads(BatchNorm(use_running_average=False, relu=True), False, x, params,
                          stats)
    ours = _loss_and_grads(BatchNorm(use_running_average=False, relu=True, fused=True,
                                     dtype=jnp.float32), False, x, params, stats)
    dx_ref, dx = ref[3][1], ours[3][1]
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx[..., 0], dx_ref[..., 0], atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)


def test_eval_mode_and_init_are_flax():
    x = _x()
    params, stats = _variables(x)
    for fused in (False, True):
        m = BatchNorm(use_running_average=True, relu=True, fused=fused, dtype=jnp.float32)
        init = m.init(jax.random.PRNGKey(0), x)
        ref_init = nn.BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), x)
        assert jax.tree.structure(init) == jax.tree.structure(ref_init)
        for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(ref_init), strict=True):
            np.testing.assert_array_equal(a, b)
        v = {"params": params, "batch_stats": stats}
        ref = nn.relu(nn.BatchNorm(use_running_average=True).apply(v, x))
        np.testing.assert_array_equal(m.apply(v, x), ref)
    # Initialising in train mode leaves the running statistics at their initial values.
    v = BatchNorm(use_running_average=False, fused=True, dtype=jnp.float32).init(
        jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(C))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(C))


def test_fused_under_vmap_equals_a_loop():
    """The sweep evaluates many parameter sets with vmap: the fused forward and backward
    batch like any function, over the parameters and over the inputs."""
    xs = jnp.stack([_x(shape=(4, 3, 3, C)), _x(shape=(4, 3, 3, C), seed=5)])
    scales = jnp.stack([jnp.linspace(0.5, 1.5, C), jnp.linspace(1.5, 0.5, C)])
    bias = jnp.zeros(C)

    def f(scale, x):
        def loss(s, x):
            return jnp.sum(batch_norm_train(x, s, bias, 1e-5, True)[0] ** 2)
        return jax.grad(loss, argnums=(0, 1))(scale, x)

    for in_axes in ((0, None), (None, 0), (0, 0)):
        args = [a if axis == 0 else a[0] for a, axis in zip((scales, xs), in_axes, strict=True)]
        stacked = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
        for i in range(2):
            one = f(*[a[i] if axis == 0 else a for a, axis in zip(args, in_axes, strict=True)])
            for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(one), strict=True):
                np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-5)


def test_fused_at_a_real_batch_size():
    """Batch 128 of 32x32 maps (131,072 values per channel, as in the paper's CIFAR step),
    far from zero mean (the variance is a small difference of two large sums): the output,
    the running statistics and the gradients stay within 1e-4 of autodiff's."""
    x = _x(shape=(128, 32, 32, C), seed=6) * 3.0 + 10.0
    params, stats = _variables(x)
    _, y_ref, new_ref, (dp_ref, dx_ref) = _loss_and_grads(
        BatchNorm(use_running_average=False, dtype=jnp.float32, relu=True), False, x, params,
        stats)
    _, y, new, (dp, dx) = _loss_and_grads(
        BatchNorm(use_running_average=False, dtype=jnp.float32, relu=True, fused=True), False,
        x, params, stats)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4)
    for a, b in zip(jax.tree.leaves((dp, dx)), jax.tree.leaves((dp_ref, dx_ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_fused_reduces_each_activation_once_per_pass():
    """The statistics (forward) and the scale and bias gradients (backward) each read the
    activation in one (variadic) reduction, then add up one small (N, 2C) array of partial
    sums: the program structure behind docs/benchmarks.md's "Fewer kernels in the fused
    BatchNorm" (GPU kernels themselves are counted by experiments/cost_analysis.py)."""
    x = _x(shape=(4, 3, 3, C))
    params, _ = _variables(x)

    def loss(x, scale, bias):
        y, _, _ = batch_norm_train(x, scale, bias, 1e-5, True)
        return jnp.sum(y)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, params["scale"],
                                                              params["bias"])
    reductions = [(e.primitive.name, [v.aval.shape for v in e.invars])
                  for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("reduce")]
    reductions.remove(("reduce_sum", [x.shape]))  # the loss's
    per_pass = [("reduce", [x.shape, x.shape, (), ()]), ("reduce_sum", [(4, 2 * C)])]
    assert reductions == per_pass * 2


@pytest.mark.parametrize("fields, dtype", [
    ({"axis": 1}, jnp.float32),
    ({"use_bias": False}, jnp.float32),
    ({"use_scale": False}, jnp.float32),
    ({"use_fast_variance": False}, jnp.float32),
    ({"force_float32_reductions": False}, jnp.float32),
    ({"axis_name": "batch"}, jnp.float32),
    ({"dtype": None}, jnp.float32),  # Flax would promote a bfloat16 input's output
    ({"dtype": jnp.bfloat16}, jnp.float32),  # Flax computes statistics before the cast
])
def test_fused_refuses_what_it_does_not_cover(fields, dtype):
    """Settings where the fused layer would not be nn.BatchNorm's function are refused, not
    computed differently (the models use none of them)."""
    x = _x(dtype)
    m = BatchNorm(**{"use_running_average": False, "fused": True, "dtype": jnp.float32,
                     **fields})
    with pytest.raises(ValueError, match="covers the models' case only"):
        m.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="with a mask"):
        BatchNorm(use_running_average=False, fused=True, dtype=jnp.float32).init(
            jax.random.PRNGKey(0), x, mask=jnp.ones(x.shape, bool))
    with pytest.raises(ValueError, match=r"on a float32\[6\] input"):  # no batch axis
        BatchNorm(use_running_average=False, fused=True, dtype=jnp.float32).init(
            jax.random.PRNGKey(0), jnp.ones(C))


@pytest.mark.parametrize("shape", [(6, 5, 5, 8), (40, 8)])
def test_statistics_sums_and_their_derivative(shape):
    """``statistics_sums``: the channels' sum and sum of squares over every other axis (of an
    NHWC activation and of a matrix), in float32 from bfloat16 too, and its written-out
    derivative equals autodiff's of the plain sums; a vector is refused."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2 + 0.5
    axes = tuple(range(len(shape) - 1))
    plain = (lambda v: (jnp.sum(v.astype(jnp.float32), axes),
                        jnp.sum(jnp.square(v.astype(jnp.float32)), axes)))
    probes = (jnp.linspace(-1.0, 1.0, shape[-1]), jnp.linspace(0.5, -0.3, shape[-1]))

    def loss(f, v):
        s, q = f(v)
        return jnp.sum(s * probes[0]) + jnp.sum(q * probes[1])

    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        v = x.astype(dtype)
        got, want = batchnorm.statistics_sums(v), plain(v)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == jnp.float32
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
        g, w = (jax.grad(functools.partial(loss, f))(v)
                for f in (batchnorm.statistics_sums, plain))
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"2 or more axes .* got shape \(8,\)"):
        batchnorm.statistics_sums(jnp.ones(8))
