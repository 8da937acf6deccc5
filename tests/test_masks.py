"""Tests for mcu_jax.masks against an independent plain-loop implementation."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcu_jax import masks, pytrees
from mcu_jax.data import Images

# ---------------------------------------------------------------- independent reference


def reference_mask(items, k, k_r):
    """items: list of (name, size, imp_r, imp_f). Returns the set of kept names."""
    total = sum(size for _, size, _, _ in items)
    drop_budget = int(k_r * total)
    dropped, count = set(), 0
    for name, size, _, _ in sorted(items, key=lambda it: (-it[2], it[0])):
        if count < drop_budget:
            dropped.add(name)
            count += size
    keep_budget = int(k * total)
    kept, count = set(), 0
    remaining = [it for it in items if it[0] not in dropped]
    for name, size, _, _ in sorted(remaining, key=lambda it: (-it[3], it[0])):
        if count < keep_budget:
            kept.add(name)
            count += size
    return kept


def plain_importance(g):
    g = np.asarray(g, np.float64).ravel()
    return math.sqrt(sum(float(v) * float(v) for v in g)) / g.size


def _grads(shapes, seed):
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.01, 10.0, size=len(shapes))
    return {
        f"layer_{i:02d}": {"kernel": (rng.standard_normal(s) * sc).astype(np.float32)}
        for i, (s, sc) in enumerate(zip(shapes, scales, strict=True))
    }


def _items(grads_r, grads_f):
    fr, ff = pytrees.flatten(grads_r), pytrees.flatten(grads_f)
    return [(p, fr[p].size, plain_importance(fr[p]), plain_importance(ff[p])) for p in fr]


def _kept_paths(mask):
    return {p for p, v in pytrees.flatten(mask).items() if v}


def _sizes(tree):
    return {p: int(np.size(v)) for p, v in pytrees.flatten(tree).items()}


# ---------------------------------------------------------------- parameter_mask

shapes_strategy = st.lists(
    st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes_strategy,
    seed=st.integers(0, 2**16),
    k=st.floats(0.0, 1.0),
    k_r=st.floats(0.0, 1.0),
)
def test_parameter_mask_matches_reference_and_budgets(shapes, seed, k, k_r):
    gr, gf = _grads(shapes, seed), _grads(shapes, seed + 1)
    mask = masks.parameter_mask(gr, gf, k=k, k_r=k_r)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(gr)
    assert all(type(v) is bool for v in jax.tree_util.tree_leaves(mask))
    kept = _kept_paths(mask)
    assert kept == reference_mask(_items(gr, gf), k, k_r)

    sizes = _sizes(gr)
    total, biggest = sum(sizes.values()), max(sizes.values())
    # k = 1 keeps every tensor that was not dropped: this exposes the dropped set.
    dropped = set(sizes) - _kept_paths(masks.parameter_mask(gr, gf, k=1.0, k_r=k_r))
    n_dropped = sum(sizes[p] for p in dropped)
    assert n_dropped >= math.floor(k_r * total)
    assert n_dropped < math.floor(k_r * total) + biggest or k_r == 0 and n_dropped == 0
    assert not kept & dropped
    n_kept = sum(sizes[p] for p in kept)
    if kept | dropped != set(sizes):
        assert n_kept >= math.floor(k * total)
    assert n_kept < math.floor(k * total) + biggest or n_kept == 0
    # Monotone in k: a larger k keeps a superset.
    assert kept <= _kept_paths(masks.parameter_mask(gr, gf, k=min(1.0, k + 0.2), k_r=k_r))


def test_parameter_mask_hand_example():
    # Sizes 10, 20, 30, 40 (N = 100). Retain importance ranks d > c > b > a; forget a > b > c > d.
    sizes = {"a": 10, "b": 20, "c": 30, "d": 40}
    rank_r = {"a": 1, "b": 2, "c": 3, "d": 4}
    gr = {n: np.full(s, rank_r[n] * np.sqrt(s), np.float32) for n, s in sizes.items()}
    gf = {n: np.full(s, (5 - rank_r[n]) * np.sqrt(s), np.float32) for n, s in sizes.items()}
    # k_r = 0.1: d (40 elements) is dropped, since 0 < 10 before it. k = 0.25: a (10), then
    # b (count 10 < 25) -> 30 >= 25 stop.
    assert masks.parameter_mask(gr, gf, k=0.25, k_r=0.1) == {
        "a": True,
        "b": True,
        "c": False,
        "d": False,
    }
    # k = 0 keeps nothing; k = 1 keeps everything not dropped; k_r = 0 drops nothing.
    assert not any(masks.parameter_mask(gr, gf, k=0.0, k_r=0.0).values())
    assert masks.parameter_mask(gr, gf, k=1.0, k_r=0.1) == {
        "a": True,
        "b": True,
        "c": True,
        "d": False,
    }
    assert all(masks.parameter_mask(gr, gf, k=1.0, k_r=0.0).values())
    # k_r = 0.41: d (40) then c (40 < 41) are dropped.
    assert masks.parameter_mask(gr, gf, k=1.0, k_r=0.41) == {
        "a": True,
        "b": True,
        "c": False,
        "d": False,
    }
    # Boundary: k = 0.1 -> budget 10: a (10) is taken, then 10 < 10 is false.
    assert _kept_paths(masks.parameter_mask(gr, gf, k=0.1, k_r=0.0)) == {"a"}
    assert _kept_paths(masks.parameter_mask(gr, gf, k=0.11, k_r=0.0)) == {"a", "b"}


def test_parameter_mask_ties_broken_by_path():
    g = {name: np.ones((2, 2), np.float32) for name in ("d", "b", "a", "c")}
    mask = masks.parameter_mask(g, g, k=0.5, k_r=0.25)
    # Retain ties: "a" dropped first; forget ties among b, c, d: b then c kept.
    assert mask == {"a": False, "b": True, "c": True, "d": False}


def test_tensor_importance():
    g = {"w": np.array([[3.0, 4.0]], np.float32), "b": np.zeros(3, np.float32)}
    imp = masks.tensor_importance(g)
    assert imp == {"w": pytest.approx(2.5), "b": 0.0}
    assert isinstance(imp["w"], float)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"k": -0.1}, "k"), ({"k": 1.5}, "k"), ({"k_r": 2.0}, "k_r"), ({"k_r": float("nan")}, "k_r")],
)
def test_parameter_mask_bad_fractions(kwargs, name):
    g = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=rf"^{name} must be a fraction in \[0, 1\], got"):
        masks.parameter_mask(g, g, **kwargs)


def test_parameter_mask_mismatched_trees():
    gr = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match=r"'b'.*grads_retain.*grads_forget"):
        masks.parameter_mask(gr, {"a": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"shape.*'b'"):
        masks.parameter_mask(gr, {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        masks.parameter_mask(
            gr, {"a": np.ones(3, np.float32), "b": np.array([1, np.nan], np.float32)}
        )


# ---------------------------------------------------------------- random_mask


def test_random_mask_budget_and_determinism():
    params = _grads([(i % 7 + 1, 3) for i in range(40)], seed=0)
    sizes = _sizes(params)
    total, biggest = sum(sizes.values()), max(sizes.values())
    key = jax.random.key(0)
    for fraction in (0.0, 0.1, 0.37, 0.5, 1.0):
        mask = masks.random_mask(params, fraction, key)
        assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
        n_kept = sum(sizes[p] for p in _kept_paths(mask))
        assert (
            math.floor(fraction * total) <= n_kept < math.floor(fraction * total) + biggest
            or n_kept == 0 == fraction
        )
        assert mask == masks.random_mask(params, fraction, key)
    assert _kept_paths(masks.random_mask(params, 1.0, key)) == set(sizes)
    a = masks.random_mask(params, 0.3, jax.random.key(1))
    b = masks.random_mask(params, 0.3, jax.random.key(2))
    assert a != b
    with pytest.raises(ValueError, match="fraction"):
        masks.random_mask(params, 1.2, key)
    with pytest.raises(ValueError, match=r"key must be a JAX random key .*got 0"):
        masks.random_mask(params, 0.5, 0)  # a seed where the key belongs


def test_mask_summary():
    params = {"a": np.ones((2, 5)), "b": np.ones(30), "c": np.ones(60)}
    line = masks.mask_summary({"a": True, "b": True, "c": False}, params)
    assert line == "mask keeps 40 of 100 elements (40.00%) in 2 of 3 tensors (66.67%)"
    assert "\n" not in line
    assert masks.trained_fraction({"a": True, "b": True, "c": False}, params) == 0.4
    assert masks.trained_fraction({}, {}) == 0.0
    with pytest.raises(ValueError, match="different leaf paths"):
        masks.trained_fraction({"a": True}, params)


# ---------------------------------------------------------------- mask_gradients


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3)(x)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _tiny_problem():
    """TinyNet with non-trivial running statistics (so evaluation-mode BatchNorm matters),
    41 random 6x6 images and a 32 / 9 retain / forget split."""
    rng = np.random.default_rng(0)
    n = 41
    x = rng.integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    model = TinyNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)), train=False)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map(
            lambda v: v + jnp.asarray(rng.uniform(0.1, 0.5, v.shape), v.dtype),
            variables["batch_stats"],
        ),
    }
    perm = rng.permutation(n)
    return model, variables, x, y, perm[9:], perm[:9]


def _summed_ce_grad(model, variables, x_uint8, y):
    """Gradient of the summed cross-entropy over raw images, normalised here by hand."""
    xb = (np.asarray(x_uint8).astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / (
        np.array(STD, np.float32))

    def loss(p):
        logits = model.apply({**variables, "params": p}, jnp.asarray(xb), train=False)
        logp = jax.nn.log_softmax(logits)
        return -jnp.sum(logp[jnp.arange(len(y)), y])

    return jax.jit(jax.grad(loss))(variables["params"])


def test_mask_gradients_equal_full_batch_gradient():
    model, variables, x, y, retain_idx, forget_idx = _tiny_problem()
    n, mean, std = len(y), MEAN, STD

    def full_batch_grad(idx):
        return jax.tree.map(lambda g: g / idx.size,
                            _summed_ce_grad(model, variables, x[idx], y[idx]))

    images = Images.from_arrays(x, y, mean, std)
    gr, gf = masks.mask_gradients(
        model, variables, images, retain_idx, forget_idx, batch_size=8
    )  # 32 retain = 4 full batches; 9 forget = 8 + 1
    for got, want in ((gr, full_batch_grad(retain_idx)), (gf, full_batch_grad(forget_idx))):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    # Batch size does not matter (exact accumulation), e.g. 5 (partial last batch of 2).
    gr5, _ = masks.mask_gradients(model, variables, images, retain_idx, forget_idx, batch_size=5)
    for a, b in zip(jax.tree_util.tree_leaves(gr5), jax.tree_util.tree_leaves(gr), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    mask = masks.parameter_mask(gr, gf, k=0.5, k_r=0.1)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(variables["params"])
    with pytest.raises(ValueError, match="forget_idx"):
        masks.mask_gradients(model, variables, images, retain_idx, np.array([], np.int32))
    with pytest.raises(ValueError, match="retain_idx"):
        masks.mask_gradients(model, variables, images, np.array([0, n]), forget_idx)
    # Another model's variables are named, not a Flax scope error from inside the trace.
    other = {"params": {"other": variables["params"]}, "batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match=r"TinyNet model and variables: leaf 'params/"):
        masks.mask_gradients(model, other, images, retain_idx, forget_idx)
    with pytest.raises(ValueError, match="augment_key must be a JAX random key"):
        masks.mask_gradients(model, variables, images, retain_idx, forget_idx, augment_key=3)


def test_mask_gradients_of_augmented_images():
    """With a key, batch i of each set gets the set's training augmentation from
    fold_in(set key, i) (D_r's set key fold_in(key, 0), D_f's fold_in(key, 1)): equal to
    the gradient of those augmented images computed batch by batch here; a set without
    augmentation gives the clean gradient."""
    from mcu_jax.data.transforms import augment

    model, variables, x, y, retain_idx, forget_idx = _tiny_problem()
    key = jax.random.PRNGKey(3)
    images = Images.from_arrays(x, y, MEAN, STD, "crop_flip")
    got = masks.mask_gradients(model, variables, images, retain_idx, forget_idx, batch_size=8,
                               augment_key=key)
    for part, (g, idx) in enumerate(zip(got, (retain_idx, forget_idx), strict=True)):
        set_key, total = jax.random.fold_in(key, part), None
        for i, start in enumerate(range(0, idx.size, 8)):
            b = idx[start:start + 8]
            xb = augment(jax.random.fold_in(set_key, i), jnp.asarray(x[b]), "crop_flip")
            gb = _summed_ce_grad(model, variables, xb, y[b])
            total = gb if total is None else jax.tree.map(jnp.add, total, gb)
        for a, want in zip(jax.tree.leaves(g), jax.tree.leaves(total), strict=True):
            np.testing.assert_allclose(a, want / idx.size, rtol=2e-5, atol=1e-6)
    clean = masks.mask_gradients(model, variables, images, retain_idx, forget_idx, batch_size=8)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(got[0]),
                                                     jax.tree.leaves(clean[0]), strict=True))
    again = masks.mask_gradients(model, variables, images, retain_idx, forget_idx, batch_size=8,
                                 augment_key=key)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                    jax.tree.leaves(got), strict=True))
    plain = Images.from_arrays(x, y, MEAN, STD)  # augment="none": the key changes nothing
    for a, b in zip(jax.tree.leaves(masks.mask_gradients(
            model, variables, plain, retain_idx, forget_idx, 8, augment_key=key)),
            jax.tree.leaves(clean), strict=True):
        np.testing.assert_array_equal(a, b)

def test_save_and_load_round_trip_and_refusals(tmp_path):
    params = {"conv": {"kernel": np.zeros((3, 3, 1, 4))}, "dense": {"bias": np.zeros(4)}}
    mask = {"conv": {"kernel": True}, "dense": {"bias": False}}
    path = tmp_path / "mask.json"
    masks.save(mask, path)
    assert masks.load(path, params) == mask
    # The file is the flat path -> bool map that an MCU run folder's mask.json holds.
    assert set(json.loads(path.read_text())) == set(pytrees.flatten(params))

    other = {"conv": {"kernel": np.zeros(1)}, "head": {"bias": np.zeros(1)}}
    with pytest.raises(ValueError, match=r"mask\.json: not a mask of these parameters.*"):
        masks.load(path, other)
    path.write_text('{"conv/kernel": 1, "dense/bias": false}')
    with pytest.raises(ValueError, match=r"tensor 'conv/kernel' has 1, expected true or false"):
        masks.load(path, params)
    path.write_text('{"conv/kernel": true,')  # cut short
    with pytest.raises(ValueError, match=r"mask\.json is not valid JSON \(Expecting"):
        masks.load(path, params)
    with pytest.raises(FileNotFoundError, match="no mask file at .*missing.json"):
        masks.load(tmp_path / "missing.json", params)
