"""BatchNorm recomputation and the vectorised t-sweep against independent loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DenseBN

from mcu_jax import bn, curves, evaluation, sweep
from mcu_jax.data import Images


def test_recompute_is_the_size_weighted_mean_of_batch_statistics():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(23, 2, 2, 1), dtype=np.uint8)
    images = Images.from_arrays(x, rng.integers(0, 3, 23), (0.5,), (0.25,))
    model = DenseBN()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), train=False)
    idx = rng.permutation(23)[:21]
    out = bn.recompute(model, variables, images, idx, batch_size=8, seed=None)  # 8 + 8 + 5
    w = np.asarray(variables["params"]["hidden"]["kernel"], np.float64)
    b = np.asarray(variables["params"]["hidden"]["bias"], np.float64)
    h = ((x[idx] / 255.0 - 0.5) / 0.25).reshape(21, -1) @ w + b
    parts = [h[:8], h[8:16], h[16:]]
    mean = sum(len(p) * p.mean(0) for p in parts) / 21
    var = sum(len(p) * p.var(0) for p in parts) / 21
    np.testing.assert_allclose(out["batch_stats"]["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], var, rtol=1e-5, atol=1e-6)


def test_recompute_sees_the_images_training_augmentation():
    """Images trained with crop_flip get BatchNorm statistics of crop_flip batches (one fixed
    key per batch, the remainder's last), like the running statistics of training; clean
    images keep the plain statistics."""
    from mcu_jax.data import transforms

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(21, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 21)
    model = DenseBN()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    w = np.asarray(variables["params"]["hidden"]["kernel"], np.float64)
    b = np.asarray(variables["params"]["hidden"]["bias"], np.float64)
    keys = jax.random.split(bn.AUGMENT_KEY, 3)  # two full batches of 8 and a remainder of 5
    parts = []
    for key, rows in zip(keys, (slice(0, 8), slice(8, 16), slice(16, 21)), strict=True):
        seen = np.asarray(transforms.augment(key, jnp.asarray(x[rows]), "crop_flip"))
        parts.append(((seen / 255.0 - 0.5) / 0.25).reshape(len(seen), -1) @ w + b)
    mean = sum(len(p) * p.mean(0) for p in parts) / 21
    var = sum(len(p) * p.var(0) for p in parts) / 21
    augmented = Images.from_arrays(x, y, (0.5,), (0.25,), augment="crop_flip")
    out = bn.recompute(model, variables, augmented, np.arange(21), batch_size=8, seed=None)
    np.testing.assert_allclose(out["batch_stats"]["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], var, rtol=1e-5, atol=1e-6)
    clean = bn.recompute(model, variables, Images.from_arrays(x, y, (0.5,), (0.25,)),
                         np.arange(21), batch_size=8, seed=None)
    assert not np.allclose(clean["batch_stats"]["bn"]["var"], var, rtol=1e-3)


@pytest.mark.parametrize("group", [2, 3, 7, 50])
def test_grouped_batchnorm_pass_equals_one_batch_at_a_time(group, theta_o, small_model):
    """``group`` batches at once (padded to whole groups where 7 full batches do not divide,
    capped at 7 where it exceeds them), each with its own augmentation key and statistics:
    the statistics of one batch after another, up to float rounding, with the remainder."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(61, 8, 8, 1), dtype=np.uint8)  # 7 batches of 8 + 5
    images = Images.from_arrays(x, rng.integers(0, 10, 61), (0.5,), (0.25,), "crop_flip")
    one = bn.recompute(small_model, theta_o, images, np.arange(61), batch_size=8)
    grouped = bn.recompute(small_model, theta_o, images, np.arange(61), batch_size=8,
                           group=group)
    for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("group, steps", [(1, 7), (2, 4), (3, 3), (7, 1), (50, 1)])
def test_grouped_batchnorm_pass_runs_group_batches_per_step(group, steps, theta_o,
                                                            small_model):
    """The pass's loop runs ceil(7 / group) steps, each over the group's images at once."""
    images = Images.from_arrays(np.zeros((56, 8, 8, 1), np.uint8), np.zeros(56, np.int32),
                                (0.5,), (0.25,))
    batches, rest = bn.bn_batches(np.arange(56), 8)
    jaxpr = jax.make_jaxpr(lambda p: bn.batch_statistics(
        small_model, p, theta_o["batch_stats"], images, batches, rest, group))(
        theta_o["params"])
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [steps]
    per_step = -(-7 // steps)
    convs = [e for e in scans[0].params["jaxpr"].jaxpr.eqns
             if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.shape[0] == per_step * 8 for e in convs)


def test_group_layout_and_its_description():
    """The steps and batches per step that run, and how tables name them."""
    assert bn.group_layout(46, 16) == (3, 16)  # 48: two padding copies
    assert bn.group_layout(46, 47) == bn.group_layout(46, 46) == (1, 46)
    assert bn.group_layout(7, 1) == (7, 1) and bn.group_layout(0, 4) == (0, 0)
    assert bn.describe_pass(6000, 128, 16) == "46 batches of 128 + 112, 16 at once in 3 steps"
    assert bn.describe_pass(6000, 128) == "46 batches of 128 + 112, one at a time"
    assert bn.describe_pass(100, 128, 4) == "1 batch of 100, one at a time"  # one batch
    assert bn.describe_pass(256, 128, 9) == "2 batches of 128, 2 at once in 1 step"


def test_sweep_compiles_one_program_for_groups_that_run_alike(curve_points, theta_o,
                                                              digits_images, small_model):
    """bn_group is capped at the full batches there are: 5 and 9 of 4 batches run alike."""
    train_images, _ = digits_images
    plans = [sweep._plan(small_model, curve_points, [0.5], theta_o["batch_stats"],
                         (train_images, np.arange(200)), {"r": (train_images, np.arange(10))},
                         curve="bezier", bn_batch_size=50, eval_batch_size=10,
                         return_probs=False, return_stats=False, strategy="map",
                         chunk_size=None, mesh=None, bn_group=g) for g in (4, 5, 9)]
    assert [p.statics["bn_group"] for p in plans] == [4, 4, 4]


def test_grouped_batchnorm_pass_rejects_a_bad_group(theta_o, small_model, digits_images):
    from mcu_jax import sharding

    train_images, _ = digits_images
    for group in (0, 1.5, True, [2]):
        with pytest.raises(ValueError, match=re.escape(f"group={group!r}")):
            bn.recompute(small_model, theta_o, train_images, np.arange(20), group=group)
    # With a mesh the batches are split over the devices; groups would be gathered whole.
    with pytest.raises(ValueError, match="group=2 with a mesh"):
        bn.recompute(small_model, theta_o, train_images, np.arange(20), mesh=sharding.make_mesh(1),
                     group=2)


@pytest.fixture(scope="module")
def curve_points(theta_o):
    """theta_o, a perturbed control point and a perturbed end point."""
    leaves, treedef = jax.tree.flatten(theta_o["params"])
    keys = jax.random.split(jax.random.PRNGKey(3), 2 * len(leaves))

    def perturb(offset, scale):
        return jax.tree.unflatten(treedef, [
            p + scale * jax.random.normal(keys[offset + i], p.shape) * (jnp.std(p) + 1e-3)
            for i, p in enumerate(leaves)
        ])

    return [theta_o["params"], perturb(0, 0.5), perturb(len(leaves), 0.3)]


def _loop_reference(model, points, ts, template, train_images, bn_idx, sets, curve=None):
    curve = curve or (lambda points, t: curves.bezier(*points, t))
    acc, probs = {n: [] for n in sets}, {n: [] for n in sets}
    for t in ts:
        params = curve(points, float(t))
        variables = bn.recompute(model, {"params": params, "batch_stats": template},
                                 train_images, bn_idx, batch_size=128)
        for name, (images, idx) in sets.items():
            out = evaluation.outputs(model, variables, images, idx)
            acc[name].append(100 * out["correct"].mean())
            probs[name].append(out["prob"])
    return acc, probs


@pytest.mark.parametrize("strategy, chunk, bn_group", [("vmap", None, 1), ("map", 3, 1),
                                                     ("map", None, 2), ("vmap", None, 3)])
def test_sweep_equals_loop_over_t(strategy, chunk, bn_group, curve_points, theta_o,
                                  digits_images, digits_split, small_model):
    train_images, test_images = digits_images
    ts = np.array([0.0, 0.3, 0.55, 0.8, 1.0], np.float32)
    sets = {
        "retain": (train_images, digits_split.retain[:300]),
        "forget": (train_images, digits_split.forget),
        "test": (test_images, digits_split.test),
    }
    bn_idx = digits_split.retain[:400]
    result = sweep.sweep(small_model, curve_points, ts, theta_o["batch_stats"],
                         (train_images, bn_idx), sets, return_probs=True,
                         strategy=strategy, chunk_size=chunk, eval_batch_size=128,
                         bn_group=bn_group)
    acc, probs = _loop_reference(small_model, curve_points, ts, theta_o["batch_stats"],
                                 train_images, bn_idx, sets)
    for name in sets:
        np.testing.assert_allclose(result.acc[name], acc[name], atol=1e-3)
        np.testing.assert_allclose(result.probs[name], np.stack(probs[name]), atol=1e-4)
    assert result.probs["forget"].shape == (5, len(digits_split.forget))


def test_polychain_sweep_equals_loop_over_the_chain(curve_points, theta_o, digits_images,
                                                   digits_split, small_model):
    """curve="polychain" sweeps the chain theta_o -> theta_c (t = 1/2) -> theta_p, not the
    Bezier curve of the same points (the two differ away from t = 0 and 1)."""
    train_images, test_images = digits_images
    ts = np.array([0.25, 0.5, 0.7], np.float32)
    sets = {"forget": (train_images, digits_split.forget),
            "test": (test_images, digits_split.test)}
    bn_idx = digits_split.retain[:256]
    result = sweep.sweep(small_model, curve_points, ts, theta_o["batch_stats"],
                         (train_images, bn_idx), sets, return_probs=True, curve="polychain")
    acc, probs = _loop_reference(small_model, curve_points, ts, theta_o["batch_stats"],
                                 train_images, bn_idx, sets, curve=curves.polychain)
    _, bezier_probs = _loop_reference(small_model, curve_points, ts, theta_o["batch_stats"],
                                      train_images, bn_idx, sets)
    for name in sets:
        np.testing.assert_allclose(result.acc[name], acc[name], atol=1e-3)
        np.testing.assert_allclose(result.probs[name], np.stack(probs[name]), atol=1e-4)
        assert np.abs(result.probs[name] - np.stack(bezier_probs[name])).max() > 1e-2


def test_sweep_at_t0_is_theta_o_with_recomputed_statistics(curve_points, theta_o,
                                                           digits_images, digits_split,
                                                           small_model):
    train_images, _ = digits_images
    idx = digits_split.retain[:200]
    result = sweep.sweep(small_model, curve_points, [0.0], theta_o["batch_stats"],
                         (train_images, idx), {"r": (train_images, idx)})
    variables = bn.recompute(small_model, theta_o, train_images, idx)
    assert result.acc["r"][0] == pytest.approx(
        evaluation.accuracy(small_model, variables, train_images, idx), abs=1e-4)


def test_sweep_with_folded_batchnorm_measures_the_same(curve_points, theta_o, digits_images,
                                                       digits_split, small_model):
    """``fold_bn`` changes how evaluation computes, not what: the same accuracies and (up to
    float rounding) the same probabilities at every t."""
    train_images, test_images = digits_images
    args = (small_model, curve_points, np.linspace(0, 1, 4), theta_o["batch_stats"],
            (train_images, digits_split.retain[:256]),
            {"f": (train_images, digits_split.forget), "t": (test_images, digits_split.test)})
    plain = sweep.sweep(*args, return_probs=True)
    folded = sweep.sweep(*args, return_probs=True, fold_bn=True)
    for name in plain.acc:
        np.testing.assert_allclose(folded.acc[name], plain.acc[name], atol=1e-4)
        np.testing.assert_allclose(folded.probs[name], plain.probs[name], rtol=1e-4, atol=1e-5)


def test_batchnorm_batches_mix_a_sorted_set_in_a_fixed_order():
    """A class-sorted set is cut into batches of a fixed pseudo-random order (the shuffled
    loader of update_bn), whatever order the indices come in; seed=None keeps it."""
    idx = np.arange(40, dtype=np.int32)
    full, rest = bn.bn_batches(idx, 16)
    again, _ = bn.bn_batches(idx[::-1], 16)
    assert full.shape == (2, 16) and rest.shape == (8,)
    np.testing.assert_array_equal(full, again)  # the set decides, not its order
    assert sorted(np.concatenate([full.ravel(), rest]).tolist()) == idx.tolist()
    assert not np.array_equal(full.ravel(), idx[:32])  # not the sorted order
    kept, _ = bn.bn_batches(idx, 16, seed=None)
    np.testing.assert_array_equal(kept.ravel(), idx[:32])
    other, _ = bn.bn_batches(idx, 16, seed=1)
    assert not np.array_equal(other, full)


def test_batchnorm_pass_of_a_model_with_dropout():
    """A model with dropout after its BatchNorm (as VGG-16-BN's classifier): the train-mode
    pass needs (and gets) a dropout key, and its statistics match the model's own call."""
    import flax.linen as nn

    class DropoutBN(nn.Module):
        bn_momentum: float = 0.9

        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(6)(x.reshape(x.shape[0], -1))
            x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(3)(x)

    model = DropoutBN()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(6, 2, 2, 1), dtype=np.uint8)
    images = Images.from_arrays(x, rng.integers(0, 3, 6), (0.5,), (0.25,))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), train=False)
    out = bn.recompute(model, variables, images, np.arange(6), batch_size=6)
    _, new = model.clone(bn_momentum=0.0).apply(
        variables, jnp.asarray((x / 255.0 - 0.5) / 0.25, jnp.float32), train=True,
        mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(5)})
    for a, b in zip(jax.tree.leaves(out["batch_stats"]), jax.tree.leaves(new["batch_stats"]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sweep_rejects_bad_input(curve_points, theta_o, digits_images, small_model):
    train_images, _ = digits_images
    sets = {"r": (train_images, np.arange(10))}
    args = (small_model, curve_points)
    bn_set = (train_images, np.arange(10))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep.sweep(*args, [0.5, 1.5], theta_o["batch_stats"], bn_set, sets)
    with pytest.raises(ValueError, match="strategy"):
        sweep.sweep(*args, [0.5], theta_o["batch_stats"], bn_set, sets, strategy="pmap")
    with pytest.raises(ValueError, match="unknown curve"):
        sweep.sweep(*args, [0.5], theta_o["batch_stats"], bn_set, sets, curve="spline")
    with pytest.raises(ValueError, match="bn_group=0"):
        sweep.sweep(*args, [0.5], theta_o["batch_stats"], bn_set, sets, bn_group=0)
    bad = [curve_points[0], curve_points[1], {"other": jnp.zeros(3)}]
    with pytest.raises(ValueError, match="mismatch"):
        sweep.sweep(small_model, bad, [0.5], theta_o["batch_stats"], bn_set, sets)
    # A grid of t is not flattened, nor a fractional chunk rounded down.
    with pytest.raises(ValueError, match=r"ts must be 1-d .*got shape \(2, 2\)"):
        sweep.sweep(*args, [[0.1, 0.2], [0.3, 0.4]], theta_o["batch_stats"], bn_set, sets)
    for chunk in (1.5, 0, True):
        with pytest.raises(ValueError, match=re.escape(f"chunk_size must be an int >= 1, got "
                                                       f"{chunk!r}")):
            sweep.sweep(*args, [0.5], theta_o["batch_stats"], bn_set, sets, chunk_size=chunk)
    with pytest.raises(ValueError, match=r"bn_set has indices outside \[0, 1437\)"):
        sweep.sweep(*args, [0.5], theta_o["batch_stats"], (train_images, np.array([0, 9999])),
                    sets)
    # Another model's params or batch_stats are named before anything is compiled (shapes
    # suffice: nothing of them is read).
    from mcu_jax.models import create, init_variables

    other = jax.eval_shape(lambda: init_variables(create("resnet20", 10), jax.random.PRNGKey(0),
                                                  (8, 8, 1)))
    model_name = type(small_model).__name__
    with pytest.raises(ValueError, match=rf"{model_name} model's params and points\[0\]: leaf"):
        sweep.sweep(small_model, [other["params"]] * 3, [0.5], theta_o["batch_stats"], bn_set,
                    sets)
    with pytest.raises(ValueError, match=rf"{model_name} model's batch_stats and template: "
                                         "leaf"):
        sweep.sweep(*args, [0.5], other["batch_stats"], bn_set, sets)


@pytest.mark.parametrize("strategy, chunk, mesh", [("vmap", None, False), ("map", 2, False),
                                                   ("vmap", 2, True)])
def test_sweep_returns_the_recomputed_statistics(strategy, chunk, mesh, curve_points, theta_o,
                                                 digits_images, digits_split, small_model):
    """``return_stats``: per t the statistics ``bn.recompute`` gives theta(t) (same float32 t),
    with and without chunks (the last one padded) and through the t-parallel (mesh) path."""
    from mcu_jax import sharding

    train_images, _ = digits_images
    ts = np.array([0.3, 0.8, 0.91], np.float32)
    bn_idx = digits_split.retain[:300]
    sets = {"forget": (train_images, digits_split.forget)}
    args = (small_model, curve_points, ts, theta_o["batch_stats"], (train_images, bn_idx), sets)
    kwargs = dict(strategy=strategy, chunk_size=chunk, bn_batch_size=128,
                  mesh=sharding.make_mesh(1) if mesh else None)
    result = sweep.sweep(*args, return_stats=True, **kwargs)
    assert sweep.sweep(*args, **kwargs).batch_stats is None  # off by default
    stats = result.batch_stats
    assert jax.tree.structure(stats) == jax.tree.structure(theta_o["batch_stats"])
    for leaf, ref in zip(jax.tree.leaves(stats), jax.tree.leaves(theta_o["batch_stats"]),
                         strict=True):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == ref.dtype
        assert leaf.shape == (ts.size, *ref.shape)
    for i, t in enumerate(result.ts):
        params = curves.bezier(*curve_points, t)
        expected = bn.recompute(small_model, {"params": params,
                                              "batch_stats": theta_o["batch_stats"]},
                                train_images, bn_idx, batch_size=128)["batch_stats"]
        got = jax.tree.map(lambda a, i=i: a[i], stats)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        # Those variables are the model the sweep measured.
        acc = evaluation.accuracy(small_model, {"params": params, "batch_stats": got},
                                  train_images, digits_split.forget)
        assert result.acc["forget"][i] == pytest.approx(acc, rel=1e-6)
