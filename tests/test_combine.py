"""combine.weighted_sum: packed points summed tensor by tensor, by XLA or by one kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import combine, curves, packing

# Sizes around the kernel's block (1024): under, over, a multiple; one tensor of another
# dtype, packed in a vector of its own, between the others (the sums come in layout order).
SHAPES = {"conv/kernel": (16, 3, 3, 8), "half/kernel": (7, 9), "head/kernel": (64, 10),
          "w/kernel": (32, 32), "big": (2, 1500)}


def _points(n: int, seed: int = 0) -> tuple[packing.Layout, list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    flats = [{k: jnp.asarray(rng.normal(size=s),
                             jnp.bfloat16 if k.startswith("half") else jnp.float32)
              for k, s in SHAPES.items()} for _ in range(n)]
    layout = packing.Layout.of(flats[0])
    return layout, [packing.pack(layout, f) for f in flats], flats


@pytest.mark.parametrize("impl", ["interpret", "xla"])
def test_sums_equal_float64_and_the_curves_own(impl):
    layout, packed, flats = _points(3)
    weights = curves.weights("bezier", jnp.float32(0.3))
    got = combine.weighted_sum(layout, packed, weights, impl=impl)
    assert list(got) == list(layout.paths)
    want = curves.bezier(*flats, 0.3)
    for k, shape in SHAPES.items():
        assert got[k].shape == shape and got[k].dtype == flats[0][k].dtype, k
        # the curve's sums, bit for bit (XLA's; the interpreted kernel runs the same ops)
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        exact = sum(float(w) * np.asarray(f[k], np.float64)
                    for w, f in zip(weights, flats, strict=True))
        tol = 1e-6 if flats[0][k].dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(got[k], np.float64), exact, rtol=tol, atol=tol)


def test_each_tensor_in_its_dtype_and_auto_is_xla_off_the_gpu():
    layout, packed, flats = _points(2, seed=1)
    weights = [jnp.float32(0.75), jnp.float32(0.25)]
    dtypes = {"head/kernel": jnp.bfloat16, "conv/kernel": jnp.bfloat16}
    kernel = combine.weighted_sum(layout, packed, weights, dtypes, impl="interpret")
    plain = combine.weighted_sum(layout, packed, weights, dtypes, impl="xla")
    auto = jax.jit(lambda *p: combine.weighted_sum(layout, p, weights, dtypes))(*packed)
    for k in SHAPES:
        want = dtypes.get(k, flats[0][k].dtype)
        assert kernel[k].dtype == plain[k].dtype == auto[k].dtype == want, k
        # the sum in the points' dtype (the weights too), then rounded
        w0, w1 = (w.astype(flats[0][k].dtype) for w in weights)
        summed = (w0 * flats[0][k] + w1 * flats[1][k]).astype(want)
        for got in (kernel, plain, auto):
            np.testing.assert_array_equal(got[k], summed, err_msg=k)


def test_many_points_and_an_empty_layout():
    layout, packed, flats = _points(5, seed=2)
    weights = curves.weights("polychain", jnp.float32(0.6), n=5)
    got = combine.weighted_sum(layout, packed, weights, impl="interpret")
    want = curves.polychain(flats, 0.6)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    empty = packing.Layout.of({})
    assert combine.weighted_sum(empty, [{}, {}], [1.0, 0.0], impl="interpret") == {}


def test_bad_input_is_refused():
    layout, packed, _ = _points(3)
    weights = [0.2, 0.3, 0.5]
    with pytest.raises(ValueError, match="impl must be one of"):
        combine.weighted_sum(layout, packed, weights, impl="triton")
    with pytest.raises(ValueError, match="2 weights for 3 points"):
        combine.weighted_sum(layout, packed, weights[:2])
    with pytest.raises(ValueError, match="0 weights for 0 points"):
        combine.weighted_sum(layout, [], [])
    with pytest.raises(ValueError, match=r"must be scalars, got shapes \[\(\), \(2,\), \(\)\]"):
        combine.weighted_sum(layout, packed, [0.2, jnp.ones(2), 0.5])
    with pytest.raises(ValueError, match=r"tensors not in the layout: \['nope'\]"):
        combine.weighted_sum(layout, packed, weights, {"nope": jnp.bfloat16})
    short = {k: v[:-1] for k, v in packed[1].items()}
    with pytest.raises(ValueError, match=r"weighted_sum: the vector 'float32:\w+' is float32"):
        combine.weighted_sum(layout, [packed[0], short, packed[2]], weights)
    with pytest.raises(ValueError, match="no vector"):
        combine.weighted_sum(layout, [packed[0], {}, packed[2]], weights)


def test_kernels_of_at_most_max_outputs_and_empty_tensors(monkeypatch):
    """A layout with more tensors than one kernel takes (``MAX_OUTPUTS``, 2 here) is summed
    by several kernels, and an empty tensor needs none: the same sums."""
    monkeypatch.setattr(combine, "MAX_OUTPUTS", 2)
    rng = np.random.default_rng(3)
    shapes = {**SHAPES, "empty/kernel": (0, 4), "last": (3,)}
    flats = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
             for _ in range(3)]
    layout = packing.Layout.of(flats[0])
    packed = [packing.pack(layout, f) for f in flats]
    weights = curves.weights("bezier", jnp.float32(0.8))
    calls = []
    original = combine._pallas
    monkeypatch.setattr(combine, "_pallas", lambda *a, **k: calls.append(a[3]) or original(
        *a, **k))
    got = combine.weighted_sum(layout, packed, weights, impl="interpret")
    assert [len(sizes) for sizes in calls] == [2, 2, 2]  # 6 non-empty tensors
    want = curves.bezier(*flats, 0.8)
    for k, shape in shapes.items():
        assert got[k].shape == shape
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
