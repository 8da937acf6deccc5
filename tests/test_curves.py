"""Tests for mcu_jax.curves: exact ends, formulas, derivatives, jit/vmap, batching, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import curves


def _random_tree(seed, dtype=np.float32, scale=1.0):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray((rng.standard_normal(shape) * scale).astype(dtype))

    return {
        "params": {
            "Conv_0": {"kernel": arr(3, 3, 2, 4), "bias": arr(4)},
            "Dense_0": {"kernel": arr(16, 5), "bias": arr(5)},
        },
        "scalar": arr(),
    }


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.dtype == y.dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _assert_tree_close(a, b, **tol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **tol)


def _points(n, seed=0, **kw):
    return [_random_tree(seed + 10 * i, **kw) for i in range(n)]


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_bezier_exact_at_ends(scale):
    o, c, p = _points(3, seed=1, scale=scale)
    _assert_tree_equal(curves.bezier(o, c, p, 0.0), o)
    _assert_tree_equal(curves.bezier(o, c, p, 1.0), p)
    _assert_tree_equal(curves.bezier(o, c, p, 0), o)
    _assert_tree_equal(curves.bezier(o, c, p, jnp.float32(1.0)), p)
    jitted = jax.jit(curves.bezier)
    _assert_tree_equal(jitted(o, c, p, jnp.float32(0.0)), o)
    _assert_tree_equal(jitted(o, c, p, jnp.float32(1.0)), p)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("fn", [curves.bernstein, curves.polychain])
def test_general_curves_exact_at_ends(fn, n):
    pts = _points(n, seed=2)
    _assert_tree_equal(fn(pts, 0.0), pts[0])
    _assert_tree_equal(fn(pts, 1.0), pts[-1])
    batched = jax.jit(fn)(pts, jnp.array([0.0, 0.3, 1.0]))
    _assert_tree_equal(jax.tree_util.tree_map(lambda x: x[0], batched), pts[0])
    _assert_tree_equal(jax.tree_util.tree_map(lambda x: x[2], batched), pts[-1])


def test_dtype_preserved_bfloat16_and_mixed():
    o, c, p = _points(3, seed=3)
    mixed = [jax.tree_util.tree_map(lambda x: x, t) for t in (o, c, p)]
    for t in mixed:
        t["params"]["Dense_0"]["kernel"] = t["params"]["Dense_0"]["kernel"].astype(jnp.bfloat16)
    out = curves.bezier(*mixed, 0.3)
    assert out["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
    assert out["params"]["Conv_0"]["kernel"].dtype == jnp.float32
    _assert_tree_equal(curves.bezier(*mixed, 0.0), mixed[0])
    _assert_tree_equal(curves.bezier(*mixed, 1.0), mixed[2])


def test_bfloat16_points_use_the_exact_t():
    """The weights come from t in float32 even for bfloat16 points: t = 0.999 rounds to 1.0
    in bfloat16, which would put theta(t) exactly at theta_p."""
    o, c, p = (jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), t)
               for t in _points(3, seed=4))
    t = 0.999
    out = curves.bezier(o, c, p, jnp.float32(t))
    for got, a, b, d in zip(*(jax.tree_util.tree_leaves(x) for x in (out, o, c, p)),
                            strict=True):
        a, b, d = (np.asarray(v, np.float64) for v in (a, b, d))
        expected = (1 - t) ** 2 * a + 2 * t * (1 - t) * b + t**2 * d
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-2,
                                   atol=1e-2)
    differs = [not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(p),
                               strict=True)]
    assert any(differs)


@pytest.mark.parametrize("t", [0.5, 0.25, 0.8])
def test_bezier_matches_formula(t):
    o, c, p = _points(3, seed=4)
    expected = jax.tree_util.tree_map(
        lambda a, b, d: (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * d, o, c, p
    )
    _assert_tree_close(curves.bezier(o, c, p, t), expected, rtol=1e-6, atol=1e-6)


def test_bernstein_three_points_equals_bezier():
    pts = _points(3, seed=5)
    for t in (0.0, 0.1, 0.5, 0.77, 1.0):
        _assert_tree_equal(curves.bernstein(pts, t), curves.bezier(*pts, t))


def test_bernstein_four_points_formula():
    pts = _points(4, seed=6)
    t = 0.3
    w = [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3]
    expected = jax.tree_util.tree_map(
        lambda *xs: sum(wi * x for wi, x in zip(w, xs, strict=True)), *pts
    )
    _assert_tree_close(curves.bernstein(pts, t), expected, rtol=1e-5, atol=1e-6)


def test_polychain_knots_and_linear_between():
    pts = _points(4, seed=7)
    for k in range(4):
        _assert_tree_close(curves.polychain(pts, k / 3), pts[k], rtol=1e-6, atol=1e-6)
    # Halfway between knots 1 and 2, and a quarter of the way between 2 and 3.
    half = jax.tree_util.tree_map(lambda a, b: 0.5 * a + 0.5 * b, pts[1], pts[2])
    _assert_tree_close(curves.polychain(pts, 0.5), half, rtol=1e-5, atol=1e-6)
    q = jax.tree_util.tree_map(lambda a, b: 0.75 * a + 0.25 * b, pts[2], pts[3])
    _assert_tree_close(curves.polychain(pts, 2 / 3 + 0.25 / 3), q, rtol=1e-5, atol=1e-5)
    # Two points: the straight line.
    line = jax.tree_util.tree_map(lambda a, b: 0.6 * a + 0.4 * b, pts[0], pts[1])
    _assert_tree_close(curves.polychain(pts[:2], 0.4), line, rtol=1e-6, atol=1e-6)


def test_midpoint_gives_straight_line():
    o, p = _points(2, seed=8)
    c = curves.midpoint(o, p)
    assert jax.tree_util.tree_structure(c) == jax.tree_util.tree_structure(o)
    t = 0.37
    line = jax.tree_util.tree_map(lambda a, b: (1 - t) * a + t * b, o, p)
    _assert_tree_close(curves.bezier(o, c, p, t), line, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bezier", "bernstein", "polychain"])
def test_gradient_in_t_matches_finite_differences(kind):
    with jax.enable_x64(True):
        pts = _points(4 if kind != "bezier" else 3, seed=9, dtype=np.float64)
        fn = curves.curve_fn(kind)
        v = _random_tree(99, dtype=np.float64)

        @jax.jit
        def f(t):
            out = fn(*pts, t) if kind == "bezier" else fn(pts, t)
            return sum(jnp.sum(a * b) for a, b in zip(_leaves(out), _leaves(v), strict=True))

        # Away from polychain knots (1/3, 2/3); one-sided second-order differences at the ends.
        h = 1e-6
        for t in (0.0, 0.2, 0.55, 0.9, 1.0):
            if t == 0.0:
                fd = (-3 * f(t) + 4 * f(t + h) - f(t + 2 * h)) / (2 * h)
            elif t == 1.0:
                fd = (3 * f(t) - 4 * f(t - h) + f(t - 2 * h)) / (2 * h)
            else:
                fd = (f(t + h) - f(t - h)) / (2 * h)
            g = jax.jit(jax.grad(f))(jnp.float64(t))
            assert np.isfinite(g)
            np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-7)


def test_gradient_wrt_control_point_closed_form():
    o, c, p = _points(3, seed=10)
    v = _random_tree(11)

    def f(c, t):
        out = curves.bezier(o, c, p, t)
        return sum(jnp.sum(a * b) for a, b in zip(_leaves(out), _leaves(v), strict=True))

    grad_c = jax.jit(jax.grad(f))
    for t in (0.0, 0.3, 0.5, 1.0):
        w = 2 * (1 - t) * t
        expected = jax.tree_util.tree_map(lambda x, w=w: w * x, v)
        _assert_tree_close(grad_c(c, t), expected, rtol=1e-6, atol=1e-7)


def test_jit_and_vmap_match_loop_and_batch_has_leading_axis():
    o, c, p = _points(3, seed=12)
    ts = jnp.linspace(0.0, 1.0, 7)
    loop = [curves.bezier(o, c, p, float(t)) for t in ts]
    batched = curves.bezier(o, c, p, ts)
    vmapped = jax.vmap(lambda t: curves.bezier(o, c, p, t))(ts)
    jitted_batch = jax.jit(curves.bezier)(o, c, p, ts)
    for out in (batched, vmapped, jitted_batch):
        for i, ref in enumerate(loop):
            _assert_tree_close(
                jax.tree_util.tree_map(lambda x, i=i: x[i], out), ref, rtol=1e-6, atol=1e-7
            )
    for leaf, ref in zip(_leaves(batched), _leaves(o), strict=True):
        assert leaf.shape == (7, *ref.shape)
    jitted = jax.jit(curves.bezier)
    for t, ref in zip(ts, loop, strict=True):
        _assert_tree_close(jitted(o, c, p, t), ref, rtol=1e-6, atol=1e-7)
    # vmap over the points too (e.g. an ensemble of control points).
    cs = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), c)
    outs = jax.vmap(lambda cc: curves.bezier(o, cc, p, 0.4))(cs)
    _assert_tree_close(
        jax.tree_util.tree_map(lambda x: x[1], outs),
        curves.bezier(o, jax.tree_util.tree_map(lambda x: 2 * x, c), p, 0.4),
        rtol=1e-6,
        atol=1e-6,
    )


def test_mismatched_trees_name_the_path():
    o, c, p = _points(3, seed=13)
    bad = jax.tree_util.tree_map(lambda x: x, c)
    bad["params"]["Dense_0"]["bias"] = jnp.zeros(6)
    with pytest.raises(ValueError, match=r"params/Dense_0/bias.*theta_c"):
        curves.bezier(o, bad, p, 0.5)
    bad = jax.tree_util.tree_map(lambda x: x, p)
    bad["params"]["Conv_0"]["kernel"] = bad["params"]["Conv_0"]["kernel"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"params/Conv_0/kernel.*theta_p"):
        curves.bezier(o, c, bad, 0.5)
    bad = jax.tree_util.tree_map(lambda x: x, o)
    del bad["scalar"]
    with pytest.raises(ValueError, match="scalar"):
        curves.bernstein([o, c, bad], 0.5)
    with pytest.raises(ValueError, match="points"):
        curves.polychain([o, c, bad], 0.5)


def test_integer_leaves_and_too_few_points_rejected():
    tree = {"w": jnp.ones(3, jnp.int32)}
    with pytest.raises(ValueError, match="w.*int32"):
        curves.bezier(tree, tree, tree, 0.5)
    with pytest.raises(ValueError, match="at least 2"):
        curves.bernstein([_random_tree(0)], 0.5)


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), np.array([0.2, 1.01])])
def test_t_outside_unit_interval_rejected(t):
    o, c, p = _points(3, seed=14)
    with pytest.raises(ValueError, match="t must lie in"):
        curves.bezier(o, c, p, t)


def test_concrete_bfloat16_t_is_a_real_number():
    o, c, p = _points(3, seed=16)
    half = curves.bezier(o, c, p, jnp.bfloat16(0.5))
    for a, b in zip(_leaves(half), _leaves(curves.bezier(o, c, p, 0.5)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="t must lie in"):
        curves.bezier(o, c, p, jnp.bfloat16(1.5))


def test_bad_t_shape_and_traced_t_not_checked():
    o, c, p = _points(3, seed=15)
    with pytest.raises(ValueError, match="shape"):
        curves.bezier(o, c, p, jnp.zeros((2, 2)))
    # A traced t cannot be checked: extrapolation runs without error.
    out = jax.jit(curves.bezier)(o, c, p, jnp.float32(2.0))
    assert np.all(np.isfinite(_leaves(out)[0]))


def test_curve_fn():
    assert curves.curve_fn("bezier") is curves.bezier
    assert curves.curve_fn("polychain") is curves.polychain
    with pytest.raises(ValueError, match="kind"):
        curves.curve_fn("spline")
    a, b, c = ({"w": np.full(2, v, np.float32)} for v in (0.0, 4.0, 1.0))
    np.testing.assert_array_equal(curves.point("bezier", [a, b, c], 0.5)["w"],
                                  curves.bezier(a, b, c, 0.5)["w"])  # 0.25*0 + 0.5*4 + 0.25
    np.testing.assert_array_equal(curves.point("polychain", [a, b, c], 0.25)["w"], [2.0, 2.0])
    with pytest.raises(ValueError, match="needs 3 points"):
        curves.point("bezier", [a, c], 0.5)


def test_weights_are_the_curves_own():
    """curves.weights gives w_k(t) of theta(t) = sum_k w_k(t) points[k]: the curve of the
    unit points, at several t, for every kind; bad arguments are refused."""
    for kind, n in (("bezier", 3), ("bernstein", 4), ("polychain", 3), ("polychain", 5)):
        for t in (0.0, 0.2, 0.5, 0.75, 1.0):
            w = curves.weights(kind, t, n)
            units = [jnp.eye(n)[k] for k in range(n)]
            np.testing.assert_allclose(jnp.stack(w), curves.point(kind, units, t), atol=1e-7)
            assert sum(float(v) for v in w) == pytest.approx(1.0)
    assert float(curves.weights("bezier", 0.5)[1]) == 0.5  # 2 t (1 - t)
    with pytest.raises(ValueError, match="3 points, got n=4"):
        curves.weights("bezier", 0.5, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        curves.weights("spline", 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        curves.weights("bezier", 1.5)
    with pytest.raises(ValueError, match="t must be a scalar"):
        curves.weights("bezier", np.array([0.1, 0.2]))
