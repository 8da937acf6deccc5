"""Tests for mcu_jax.pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import pytrees


def _tree():
    return {
        "params": {
            "Conv_0": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.zeros(4)},
            "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
        },
        "list": [jnp.ones(3), (jnp.ones(()),)],
    }


def test_path_str_and_flatten_roundtrip():
    tree = _tree()
    flat = pytrees.flatten(tree)
    assert "params/Conv_0/kernel" in flat
    assert "list/1/0" in flat
    assert list(flat) == [pytrees.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    back = pytrees.unflatten(tree, flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        assert a is b


def test_unflatten_errors():
    tree = _tree()
    flat = pytrees.flatten(tree)
    missing = dict(flat)
    del missing["params/Dense_0/bias"]
    with pytest.raises(ValueError, match="params/Dense_0/bias"):
        pytrees.unflatten(tree, missing)
    with pytest.raises(ValueError, match="extra"):
        pytrees.unflatten(tree, {**flat, "extra": 1})


def test_tree_size():
    assert pytrees.tree_size(_tree()) == 36 + 4 + 8 + 2 + 3 + 1
    assert pytrees.tree_size({}) == 0


def test_check_compatible_ok_and_single():
    pytrees.check_compatible(a=_tree(), b=_tree(), c=_tree())
    pytrees.check_compatible(a=_tree())


def test_check_compatible_shape_mismatch_names_path_and_trees():
    b = _tree()
    b["params"]["Dense_0"]["kernel"] = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*theta_o.*theta_p"):
        pytrees.check_compatible(theta_o=_tree(), theta_c=_tree(), theta_p=b)


def test_check_compatible_dtype_mismatch():
    b = _tree()
    b["params"]["Conv_0"]["bias"] = jnp.zeros(4, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"dtype.*params/Conv_0/bias.*bfloat16"):
        pytrees.check_compatible(theta_o=_tree(), theta_c=b)


def test_check_compatible_structure_mismatch():
    b = _tree()
    del b["params"]["Conv_0"]["bias"]
    with pytest.raises(ValueError, match=r"params/Conv_0/bias.*theta_o.*missing from theta_c"):
        pytrees.check_compatible(theta_o=_tree(), theta_c=b)
    c = _tree()
    c["params"]["Extra"] = {"w": jnp.ones(1)}
    with pytest.raises(ValueError, match=r"params/Extra/w"):
        pytrees.check_compatible(theta_o=_tree(), theta_c=c)
    d = _tree()
    d["list"] = (d["list"][0], d["list"][1])  # list -> tuple: same paths, other container
    with pytest.raises(ValueError, match="container"):
        pytrees.check_compatible(theta_o=_tree(), theta_c=d)


def test_split_and_merge_roundtrip():
    tree = _tree()
    mask = jax.tree_util.tree_map(lambda x: x.ndim >= 2, tree)
    selected, rest = pytrees.split_by_mask(tree, mask)
    assert set(selected) == {"params/Conv_0/kernel", "params/Dense_0/kernel"}
    assert "params/Conv_0/bias" in rest and len(selected) + len(rest) == 6
    # The selected part is a pytree one can differentiate with respect to.
    g = jax.grad(lambda s: sum(jnp.sum(v) for v in s.values()))(selected)
    assert set(g) == set(selected)
    merged = pytrees.merge(selected, rest, tree)
    leaves = zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(tree), strict=True)
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)


def test_split_by_mask_mismatch_and_merge_overlap():
    tree = _tree()
    mask = jax.tree_util.tree_map(lambda x: True, tree)
    del mask["params"]["Conv_0"]["bias"]
    with pytest.raises(ValueError, match="params/Conv_0/bias"):
        pytrees.split_by_mask(tree, mask)
    flat = pytrees.flatten(tree)
    with pytest.raises(ValueError, match="both"):
        pytrees.merge(flat, {"params/Conv_0/bias": 1}, tree)


@pytest.mark.parametrize("leaf, match", [
    (jnp.ones((2, 4)), r"shape.*params/Dense_0/kernel"),  # same size, transposed
    (jnp.ones((4, 2), jnp.float16), r"dtype.*params/Dense_0/kernel.*float16"),  # same kind
])
def test_check_compatible_compares_exact_shapes_and_dtypes(leaf, match):
    b = _tree()
    b["params"]["Dense_0"]["kernel"] = leaf
    with pytest.raises(ValueError, match=match):
        pytrees.check_compatible(theta_o=_tree(), theta_p=b)


def test_check_finite_names_the_first_bad_leaf_and_skips_traced_ones():
    tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf]), "d": jnp.arange(3)}}
    with pytest.raises(ValueError, match="theta_p: leaf b/c has a NaN or infinite value"):
        pytrees.check_finite("theta_p", tree)
    pytrees.check_finite("theta_p", {"a": jnp.ones(3), "d": jnp.arange(3)})  # ints pass
    jax.jit(lambda t: pytrees.check_finite("traced", t) or t)(tree)  # cannot look: no error
    pytrees.check_finite("shapes", jax.eval_shape(lambda: tree))
    with pytest.raises(ValueError, match="leaf h has a NaN"):  # bfloat16 and host arrays too
        pytrees.check_finite("x", {"g": np.ones(2), "h": jnp.array([jnp.nan], jnp.bfloat16)})
    with pytest.raises(ValueError, match="leaf g has a NaN"):
        pytrees.check_finite("x", {"g": np.array([np.nan])})
    with pytest.raises(ValueError, match="leaf g has a NaN"):
        pytrees.check_finite("x", {"a": np.ones(1, jnp.bfloat16), "g": float("nan")})
    # Leaves on different devices are checked per device set (one compiled call each).
    first, last = jax.devices()[0], jax.devices()[-1]
    pytrees.check_finite("x", {"a": jax.device_put(jnp.ones(2), first),
                               "b": jax.device_put(jnp.ones(3), last)})
