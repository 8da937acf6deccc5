"""packing: tensors as one vector per dtype and back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import packing


def _flat():
    rng = np.random.default_rng(0)
    return {"a/kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "a/scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            "b/half": jnp.asarray(rng.normal(size=(2, 5)), jnp.bfloat16),
            "c/scalar": jnp.asarray(1.5, jnp.float32)}


def test_pack_then_unpack_is_the_identity():
    flat = _flat()
    layout = packing.Layout.of(flat)
    groups = layout.groups()
    f32, bf16 = sorted(groups, reverse=True)  # "float32:<fingerprint>", "bfloat16:<...>"
    assert f32.startswith("float32:") and bf16.startswith("bfloat16:")
    assert groups == {f32: [0, 1, 3], bf16: [2]}
    packed = packing.pack(layout, flat)
    assert {k: v.shape for k, v in packed.items()} == {f32: (77,), bf16: (10,)}
    # The float32 vector is the float32 tensors raveled in order.
    want = np.concatenate([np.ravel(flat[k]) for k in ("a/kernel", "a/scale", "c/scalar")])
    np.testing.assert_array_equal(packed[f32], want)
    back = packing.unpack(layout, packed)
    assert list(back) == list(flat)
    for k, v in flat.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    assert hash(layout) == hash(packing.Layout.of(flat))  # a static jit argument


def test_the_gradient_of_unpacked_tensors_is_packed_by_concatenation():
    """unpack's derivative concatenates the tensors' cotangents (no padded vector per
    tensor) and equals packing the per-tensor gradient."""
    flat = {k: v for k, v in _flat().items() if v.dtype == jnp.float32}
    layout = packing.Layout.of(flat)

    def loss(packed):
        tensors = packing.unpack(layout, packed)
        return sum(jnp.sum(jnp.sin(v) * (i + 1)) for i, v in enumerate(tensors.values()))

    packed = packing.pack(layout, flat)
    (key,) = packed
    program = str(jax.make_jaxpr(jax.grad(loss))(packed))
    assert "concatenate" in program and " pad" not in program
    per_tensor = jax.grad(lambda f: sum(jnp.sum(jnp.sin(v) * (i + 1))
                                        for i, v in enumerate(f.values())))(flat)
    np.testing.assert_allclose(jax.grad(loss)(packed)[key],
                               packing.pack(layout, per_tensor)[key], rtol=1e-6)


def test_mismatches_are_refused_by_name():
    flat = _flat()
    layout = packing.Layout.of(flat)
    with pytest.raises(ValueError, match=r"missing \['c/scalar'\], not in it \['d'\]"):
        packing.pack(layout, {**{k: v for k, v in flat.items() if k != "c/scalar"},
                              "d": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"'a/scale' is float32 \(5,\), the layout says "
                                         r"float32 \(4,\)"):
        packing.pack(layout, {**flat, "a/scale": jnp.ones(5)})
    with pytest.raises(ValueError, match="'b/half' is float32"):
        packing.pack(layout, {**flat, "b/half": jnp.ones((2, 5))})
    f32, bf16 = sorted(layout.groups(), reverse=True)
    with pytest.raises(ValueError, match=r"the vector 'float32:\w+' is float32 \(76,\), the "
                                         r"layout needs float32 \(77,\)"):
        packing.unpack(layout, {f32: jnp.ones(76), bf16: jnp.ones(10, jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"the vector 'bfloat16:\w+' is float32 \(10,\), "
                                         r"the layout needs bfloat16 \(10,\)"):
        packing.check(layout, {f32: jnp.ones(77), bf16: jnp.ones(10)}, "weighted_sum")
    # Vectors packed for other tensors of the same sizes (another mask) do not fit: the
    # keys fingerprint the paths and shapes.
    swapped = {"a/scale": flat["a/kernel"], "a/kernel": flat["a/scale"]}
    other = packing.Layout.of({**swapped, "b/half": flat["b/half"], "c/scalar": flat["c/scalar"]})
    assert sorted(other.groups())[1] != f32 and sorted(other.groups())[0] == bf16
    with pytest.raises(ValueError, match=r"no vector 'float32:\w+' .* packed for other "
                                         "tensors"):
        packing.unpack(layout, packing.pack(other, {**flat, **swapped}))
    empty = packing.Layout.of({})  # no tensors: no vector, and back to no tensor
    assert packing.pack(empty, {}) == {} and packing.unpack(empty, {}) == {}
