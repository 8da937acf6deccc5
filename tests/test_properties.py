"""Property-based tests (hypothesis): curves, masks, splits, adaptive beta, sweep == loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tiny_models import DenseBN

from mcu_jax import bn, curves, evaluation, masks, mcu, pytrees, sweep
from mcu_jax.data import Dataset, Images, make_split

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=4, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------------
# Curves
# ------------------------------------------------------------------------------------------

SHAPES = [(3,), (2, 2), (1, 2, 3)]  # few shapes: eager ops compile once per shape
# No subnormals: XLA's CPU backend flushes them to zero, even in 1.0 * x.
VALUES = st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def point_triples(draw):
    """Three compatible float32 pytrees {"a": ..., "b": {"c": ...}}."""
    shape_a, shape_c = draw(st.sampled_from(SHAPES)), draw(st.sampled_from(SHAPES))

    def tree():
        return {"a": draw(hnp.arrays(np.float32, shape_a, elements=VALUES)),
                "b": {"c": draw(hnp.arrays(np.float32, shape_c, elements=VALUES))}}

    return tree(), tree(), tree()


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@FAST
@given(point_triples())
def test_curve_end_points_are_exact(points):
    theta_o, theta_c, theta_p = points
    _assert_tree_equal(curves.bezier(theta_o, theta_c, theta_p, 0.0), theta_o)
    _assert_tree_equal(curves.bezier(theta_o, theta_c, theta_p, 1.0), theta_p)
    for fn in (curves.bernstein, curves.polychain):
        _assert_tree_equal(fn(list(points), 0.0), theta_o)
        _assert_tree_equal(fn(list(points), 1.0), theta_p)


@FAST
@given(point_triples(), st.floats(0, 1))
def test_bezier_is_symmetric(points, t):
    theta_o, theta_c, theta_p = points
    forward = curves.bezier(theta_o, theta_c, theta_p, t)
    backward = curves.bezier(theta_p, theta_c, theta_o, 1.0 - t)
    scale = 1.0 + max(float(np.abs(x).max()) for x in jax.tree.leaves(points))
    for x, y in zip(jax.tree.leaves(forward), jax.tree.leaves(backward), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------


@st.composite
def gradient_pairs(draw):
    """Retain and forget gradients of 1-8 tensors; few distinct importance levels so that
    ties (broken by path) are common."""
    n = draw(st.integers(1, 8))
    sizes = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    level = st.sampled_from([0.0, 0.5, 1.0, 2.0])
    grads = []
    for _ in range(2):
        levels = draw(st.lists(level, min_size=n, max_size=n))
        grads.append({f"t{i}": np.full(s, v, np.float32)
                      for i, (s, v) in enumerate(zip(sizes, levels, strict=True))})
    return grads


def _kept(mask) -> set[str]:
    return {p for p, v in pytrees.flatten(mask).items() if v}


def _check_budget(kept: set[str], sizes: dict[str, int], fraction: float, candidates: set[str]):
    """The budget rule: count >= B unless every candidate is taken; the last one taken
    started below B (so count - the largest taken size < B); nothing for B = 0."""
    budget = math.floor(fraction * sum(sizes.values()))
    count = sum(sizes[p] for p in kept)
    assert kept <= candidates
    if budget == 0:
        assert not kept
        return
    assert count >= budget or kept == candidates
    if kept:
        assert count - max(sizes[p] for p in kept) < budget


fractions = st.floats(0, 1)


@FAST
@given(gradient_pairs(), fractions, fractions, fractions)
def test_parameter_mask_budgets_and_monotonicity(grads, k1, k2, k_r):
    g_r, g_f = grads
    sizes = {p: v.size for p, v in pytrees.flatten(g_r).items()}
    k1, k2 = sorted((k1, k2))
    allowed = _kept(masks.parameter_mask(g_r, g_f, k=1.0, k_r=k_r))  # all but the dropped
    dropped = set(sizes) - allowed
    _check_budget(dropped, sizes, k_r, set(sizes))
    small = _kept(masks.parameter_mask(g_r, g_f, k=k1, k_r=k_r))
    large = _kept(masks.parameter_mask(g_r, g_f, k=k2, k_r=k_r))
    for kept, k in ((small, k1), (large, k2)):
        _check_budget(kept, sizes, k, allowed)
    assert small <= large  # a larger k keeps a superset
    # A larger k_r drops a superset.
    assert _kept(masks.parameter_mask(g_r, g_f, k=1.0, k_r=min(1.0, k_r + 0.2))) <= allowed


@FAST
@given(gradient_pairs(), fractions, fractions, st.integers(0, 2**31 - 1))
def test_random_mask_budgets_and_monotonicity(grads, f1, f2, seed):
    params = grads[0]
    sizes = {p: v.size for p, v in pytrees.flatten(params).items()}
    f1, f2 = sorted((f1, f2))
    key = jax.random.PRNGKey(seed)
    small = _kept(masks.random_mask(params, f1, key))
    large = _kept(masks.random_mask(params, f2, key))
    _check_budget(small, sizes, f1, set(sizes))
    _check_budget(large, sizes, f2, set(sizes))
    assert small <= large


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


@st.composite
def datasets(draw):
    num_classes = draw(st.integers(2, 5))
    train_counts = draw(st.lists(st.integers(1, 12), min_size=num_classes,
                                 max_size=num_classes))
    test_counts = draw(st.lists(st.integers(1, 10), min_size=num_classes,
                                max_size=num_classes))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))

    def labels(counts):
        return rng.permutation(np.repeat(np.arange(num_classes), counts)).astype(np.int32)

    y_train, y_test = labels(train_counts), labels(test_counts)
    return Dataset(name="synthetic", x_train=np.zeros((len(y_train), 1, 1, 1), np.uint8),
                   y_train=y_train, x_test=np.zeros((len(y_test), 1, 1, 1), np.uint8),
                   y_test=y_test, num_classes=num_classes, mean=(0.5,), std=(0.25,),
                   augment="none")


ratio = st.floats(0.05, 0.95)


@settings(max_examples=80, deadline=None)
@given(datasets(), st.sampled_from(["random", "class"]), ratio, ratio, st.floats(0.05, 1.0),
       st.integers(0, 2**32))
def test_split_disjoint_covering_stratified(ds, scenario, forget_ratio, val_ratio,
                                            retain_ratio, seed):
    try:
        s = make_split(ds, scenario, forget_ratio=forget_ratio, val_ratio=val_ratio,
                       retain_ratio=retain_ratio, seed=seed)
    except ValueError as err:  # a degenerate combination is refused with a reason ...
        assert str(err).startswith("make_split:")
        event("refused: " + str(err).split(";")[0])
        return  # ... which test_data.py checks case by case
    n_train, n_test = len(ds.y_train), len(ds.y_test)
    # Training set: forget and retain partition it; the subset lies in retain.
    assert np.intersect1d(s.forget, s.retain).size == 0
    np.testing.assert_array_equal(np.union1d(s.forget, s.retain), np.arange(n_train))
    assert np.isin(s.retain_subset, s.retain).all()
    assert len(s.retain_subset) == _round(retain_ratio * len(s.retain))
    if scenario == "random":
        assert len(s.forget) == _round(forget_ratio * n_train)
    else:
        np.testing.assert_array_equal(s.forget, np.flatnonzero(ds.y_train == s.forget_class))
    # Test set: val and test partition it, val stratified per class.
    assert np.intersect1d(s.val, s.test).size == 0
    np.testing.assert_array_equal(np.union1d(s.val, s.test), np.arange(n_test))
    for c in range(ds.num_classes):
        members = np.sum(ds.y_test == c)
        assert np.sum(ds.y_test[s.val] == c) == _round(val_ratio * members)
    if scenario == "class":
        np.testing.assert_array_equal(np.union1d(s.test_forget, s.test_retain), s.test)
        assert (ds.y_test[s.test_forget] == s.forget_class).all()
        assert (ds.y_test[s.test_retain] != s.forget_class).all()
    else:
        assert s.test_forget.size == 0 and s.test_retain.size == 0
    for field in ("forget", "retain", "retain_subset", "val", "test"):
        a = getattr(s, field)
        assert (np.diff(a) > 0).all()  # sorted, no repeats


# ------------------------------------------------------------------------------------------
# Adaptive beta
# ------------------------------------------------------------------------------------------


def beta_reference(acc_f, acc_r, ref_t, ref_v, values):
    """Section 2.4 in plain Python, in float32 like the implementation."""
    f32 = np.float32
    acc_f, acc_r, ref_t, ref_v = f32(acc_f), f32(acc_r), f32(ref_t), f32(ref_v)
    if acc_f <= ref_v:
        return values[0]
    if ref_v > 0:
        with np.errstate(over="ignore"):  # a tiny ref_v: inf, as in float32 on the device
            rel_f = (acc_f - ref_v) / ref_v
            rel_r = (acc_r - ref_t) / (ref_t if ref_t > 0 else f32(1))
        if rel_f < rel_r:
            return values[1]
    return values[2]


# Accuracies are multiples of 100/n for a set of n samples, so 0 or at least ~1e-6 percent;
# far smaller values only test float underflow (XLA on CPU flushes subnormal differences).
PERCENT = st.one_of(st.sampled_from([0.0, 50.0, 90.0, 100.0]),
                   st.floats(0.0009765625, 100, width=32))  # 2**-10
N_BETA = 16
_beta = jax.jit(mcu.adaptive_beta, static_argnums=4)


@st.composite
def beta_cases(draw):
    """Accuracies with frequent ties: acc_f == ref_val and equal relative changes."""
    ref_t, ref_v = draw(PERCENT), draw(PERCENT)
    kind = draw(st.sampled_from(["free", "tie_f", "tie_ratio"]))
    if kind == "tie_f":
        return ref_v, draw(PERCENT), ref_t, ref_v
    if kind == "tie_ratio":
        q = draw(st.sampled_from([0.0, 0.1, 0.25, -0.5]))
        return min(100.0, ref_v * (1 + q)), min(100.0, ref_t * (1 + q)), ref_t, ref_v
    return draw(PERCENT), draw(PERCENT), ref_t, ref_v


@FAST
@given(st.lists(beta_cases(), min_size=N_BETA, max_size=N_BETA),
       st.sampled_from([(0.0, 0.1, 0.5), (1.0, 2.0, 3.0)]))
def test_adaptive_beta_matches_the_three_case_rule(cases, values):
    cols = [jnp.asarray(np.array(c, np.float32)) for c in zip(*cases, strict=True)]
    got = np.asarray(_beta(*cols, values))
    want = [beta_reference(*c, values) for c in cases]
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))
    assert np.isfinite(got).all()


# ------------------------------------------------------------------------------------------
# The vectorised sweep equals a loop over t
# ------------------------------------------------------------------------------------------


MODEL = DenseBN()


@pytest.fixture(scope="module")
def sweep_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 2, 2, 1), dtype=np.uint8)
    images = Images.from_arrays(x, rng.integers(0, 3, 40).astype(np.int32), (0.5,), (0.25,))
    return images, np.arange(0, 30), {"a": np.arange(0, 40, 3), "b": np.arange(17, 40)}


@SLOW
@given(seed=st.integers(0, 2**31 - 1), ts=st.lists(st.floats(0, 1, width=32), min_size=3,
                                                    max_size=3),
       strategy=st.sampled_from(["vmap", "map"]))
def test_sweep_equals_loop_of_recompute_and_accuracy(sweep_data, seed, ts, strategy):
    images, bn_idx, eval_idx = sweep_data
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    inits = [MODEL.init(k, jnp.zeros((1, 2, 2, 1)), train=False) for k in keys]
    points = [v["params"] for v in inits]
    template = inits[0]["batch_stats"]
    sets = {name: (images, idx) for name, idx in eval_idx.items()}
    result = sweep.sweep(MODEL, points, ts, template, (images, bn_idx), sets,
                         bn_batch_size=8, eval_batch_size=16, strategy=strategy)
    for i, t in enumerate(ts):
        params = curves.bezier(*points, float(t))
        variables = bn.recompute(MODEL, {"params": params, "batch_stats": template}, images,
                                 bn_idx, batch_size=8)
        for name, (imgs, idx) in sets.items():
            want = evaluation.accuracy(MODEL, variables, imgs, idx)
            assert result.acc[name][i] == pytest.approx(want, abs=1e-3)
