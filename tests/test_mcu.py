"""Adaptive beta, the MCU loss, and curve training (mask honoured, resume exact)."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcu_jax import curves, mcu, models, packing, pytrees, runs
from mcu_jax.mcu import MCUConfig, adaptive_beta, split_loss

REFS = {"train": 100.0, "val": 90.0}


@pytest.mark.parametrize(
    "acc_f, acc_r, expected",
    [
        (80.0, 100.0, 0.0),  # case 1: forgotten below the validation reference
        (90.0, 100.0, 0.0),  # boundary: equal counts as forgotten
        (95.0, 99.0, 0.5),  # rel_f = 0.056 >= rel_r = -0.01: case 3
        (90.0001, 100.0, 0.5),  # rel_f > 0 = rel_r: not case 2
        (95.0, 106.0, 0.1),  # rel_f = 0.056 < rel_r = 0.06: case 2
        (99.0, 110.0, 0.5),  # boundary: (99-90)/90 = 0.1 is not < (110-100)/100 = 0.1
    ],
)
def test_adaptive_beta_cases(acc_f, acc_r, expected):
    beta = adaptive_beta(acc_f, acc_r, REFS["train"], REFS["val"])
    assert float(beta) == pytest.approx(expected)


def test_adaptive_beta_class_wise_zero_reference_is_never_nan():
    # Forget reference 0: beta is 0 only when the class is fully forgotten, never case 2.
    betas = adaptive_beta(jnp.array([0.0, 0.5, 50.0]), jnp.array([100.0, 200.0, 200.0]),
                          100.0, 0.0)
    np.testing.assert_array_equal(np.asarray(betas), [0.0, 0.5, 0.5])
    assert np.isfinite(np.asarray(betas)).all()


def test_adaptive_beta_is_jittable_and_takes_custom_values():
    f = jax.jit(lambda a, b: adaptive_beta(a, b, 100.0, 90.0, values=(1.0, 2.0, 3.0)))
    np.testing.assert_array_equal(
        np.asarray(f(jnp.array([80.0, 95.0, 95.0]), jnp.array([100.0, 106.0, 99.0]))),
        [1.0, 2.0, 3.0],
    )


def test_split_loss_empty_forget_part_is_finite():
    losses = jnp.array([1.0, 2.0, 3.0])
    mean_r, mean_f, n_r, n_f = split_loss(losses, jnp.zeros(3, bool))
    assert float(mean_r) == pytest.approx(2.0) and float(mean_f) == 0.0
    assert float(n_f) == 0.0
    # Parts with different means, so swapped roles would show: D_f = {1, 4}, D_r = {2}.
    mean_r, mean_f, n_r, n_f = split_loss(jnp.array([1.0, 2.0, 4.0]),
                                          jnp.array([True, False, True]))
    assert float(mean_r) == pytest.approx(2.0) and float(mean_f) == pytest.approx(2.5)
    assert (float(n_r), float(n_f)) == (1.0, 2.0)
    g = jax.grad(lambda v: split_loss(v, jnp.ones(3, bool))[0])(losses)
    assert np.isfinite(np.asarray(g)).all()


def _train(small_model, theta_o, theta_p, images, split, config, key, **kw):
    return mcu.train_curve(small_model, theta_o, theta_p, images, split.retain_subset,
                           split.forget, REFS, config, key, **kw)


def test_unmasked_tensors_are_bit_for_bit_unchanged(theta_o, theta_p, digits_images,
                                                    digits_split, small_model):
    train_images, _ = digits_images
    flat = pytrees.flatten(theta_o["params"])
    names = sorted(flat)
    trained = set(names[::2])
    mask = pytrees.unflatten(theta_o["params"], {k: k in trained for k in names})
    config = MCUConfig(epochs=2, progress=False, lr=0.05)
    result = _train(small_model, theta_o, theta_p, train_images, digits_split, config,
                    jax.random.PRNGKey(0), mask=mask)
    start = pytrees.flatten(curves.midpoint(theta_o["params"], theta_p["params"]))
    end = pytrees.flatten(result.theta_c)
    for k in names:
        if k in trained:
            assert not np.array_equal(end[k], start[k]), k
        else:
            np.testing.assert_array_equal(end[k], start[k])
    assert len(result.history) == 2
    assert set(result.history[0]["beta_hist"]) == {"0", "0.1", "0.5"}
    # The second epoch is timed; the first (compiling) is not; history holds no timing.
    assert len(result.epoch_seconds) == 1 and result.epoch_seconds[0] > 0
    assert "seconds" not in result.history[1]
    assert mcu.steady_epoch_seconds(result.epoch_seconds) == result.epoch_seconds[0]
    assert mcu.steady_epoch_seconds([1.0, 2.0]) == 1.5
    assert mcu.steady_epoch_seconds([]) is None


def test_adaptive_beta_comes_from_the_same_batch(theta_o, theta_p, digits_images,
                                                  digits_split, small_model):
    """beta of a batch is the rule applied to that batch's own accuracies at its t (the
    paper's Algorithm 1 and the release), not the previous batch's; a batch without a forget
    part keeps the previous beta."""
    train_images, _ = digits_images
    config = MCUConfig(progress=False)
    is_forget = np.zeros(train_images.num_examples, bool)
    is_forget[digits_split.forget] = True
    mask = jax.tree.map(lambda _: True, theta_o["params"])
    refs = (REFS["train"], REFS["val"])
    state, consts, _ = mcu.setup_curve(
        small_model, theta_o, theta_p, curves.midpoint(theta_o["params"], theta_p["params"]),
        mask, train_images, is_forget, refs, config)
    # Before any batch beta is beta_init (kept by batches that lack a part), not fixed beta.
    assert config.beta_init != config.beta and float(state.beta) == config.beta_init
    tx = optax.sgd(config.lr, momentum=config.momentum)
    step = jax.jit(mcu.make_curve_step(small_model, tx, config, theta_o["params"]))
    mixed = jnp.asarray(np.concatenate([digits_split.retain_subset[:96],
                                        digits_split.forget[:32]]), jnp.int32)
    # The losses, independently: cross-entropy of theta(t) (train-mode BatchNorm; digits has
    # no augmentation) averaged over the batch's 96 D_r rows and, apart, its 32 D_f rows.
    from mcu_jax.data.transforms import normalize

    _, m = step(state, consts, mixed, jax.random.PRNGKey(0))
    params = curves.bezier(theta_o["params"], curves.midpoint(theta_o["params"],
                                                              theta_p["params"]),
                           theta_p["params"], m["t"])
    logits, _ = small_model.apply(
        {"params": params, "batch_stats": theta_o["batch_stats"]},
        normalize(train_images.x[mixed], train_images.mean, train_images.std), train=True,
        mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, train_images.y[mixed])
    assert float(m["ce_r"]) == pytest.approx(float(ce[:96].mean()), rel=1e-5)
    assert float(m["ce_f"]) == pytest.approx(float(ce[96:].mean()), rel=1e-5)
    # The accuracies beta is computed from, in percent like the references.
    correct = np.asarray(jnp.argmax(logits, -1) == train_images.y[mixed])
    assert float(m["acc_r"]) == pytest.approx(100 * correct[:96].mean(), abs=1e-4)
    assert float(m["acc_f"]) == pytest.approx(100 * correct[96:].mean(), abs=1e-4)
    assert float(m["acc_f"]) > 1.0  # theta(t) near theta_o still knows D_f
    for i in range(6):
        state = state.replace(beta=jnp.float32(0.77))  # not a value the rule can give
        state, m = step(state, consts, mixed, jax.random.PRNGKey(i))
        expected = float(adaptive_beta(m["acc_f"], m["acc_r"], *refs))
        assert float(m["beta"]) == expected and float(state.beta) == expected
        assert float(m["loss"]) == pytest.approx(float(m["ce_r"] - expected * m["ce_f"]),
                                                 rel=1e-6)
    retain_only = jnp.asarray(digits_split.retain_subset[:128], jnp.int32)
    _, m = step(state.replace(beta=jnp.float32(0.77)), consts, retain_only,
                jax.random.PRNGKey(9))
    assert float(m["beta"]) == pytest.approx(0.77) and float(m["n_f"]) == 0
    forget_only = jnp.asarray(digits_split.forget[:32], jnp.int32)
    _, m = step(state.replace(beta=jnp.float32(0.77)), consts, forget_only,
                jax.random.PRNGKey(10))
    assert float(m["beta"]) == pytest.approx(0.77) and float(m["n_r"]) == 0


def test_polychain_curve_trains_the_chain_through_theta_c(theta_o, theta_p, digits_images,
                                                          digits_split, small_model):
    """With curve="polychain" the step's model at t is the chain theta_o -> theta_c (t = 1/2)
    -> theta_p, written out here by hand, not the Bezier curve of the same points."""
    from mcu_jax.data.transforms import normalize

    train_images, _ = digits_images
    config = MCUConfig(progress=False, curve="polychain", beta_mode="fixed")
    is_forget = np.zeros(train_images.num_examples, bool)
    is_forget[digits_split.forget] = True
    p_o, p_p = theta_o["params"], theta_p["params"]
    theta_c = jax.tree.map(lambda a, b: 0.3 * a + 0.5 * b + 0.05, p_o, p_p)  # off the line
    mask = jax.tree.map(lambda _: True, p_o)
    state, consts, _ = mcu.setup_curve(small_model, theta_o, theta_p, theta_c, mask,
                                       train_images, is_forget, (99.0, 95.0), config)
    step = jax.jit(mcu.make_curve_step(small_model, optax.sgd(config.lr), config, p_o))
    mixed = jnp.asarray(np.concatenate([digits_split.retain_subset[:96],
                                        digits_split.forget[:32]]), jnp.int32)
    x = normalize(train_images.x[mixed], train_images.mean, train_images.std)

    def ce_r(params):
        logits, _ = small_model.apply({"params": params, "batch_stats": theta_o["batch_stats"]},
                                      x, train=True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, train_images.y[mixed])
        return float(ce[:96].mean())

    seen = set()
    for i in range(8):
        _, m = step(state, consts, mixed, jax.random.PRNGKey(i))
        t = float(m["t"])
        a, b, s = (p_o, theta_c, 2 * t) if t < 0.5 else (theta_c, p_p, 2 * t - 1)
        chain = jax.tree.map(lambda u, v, s=s: u + s * (v - u), a, b)
        assert float(m["ce_r"]) == pytest.approx(ce_r(chain), rel=1e-4), t
        assert float(m["ce_r"]) != pytest.approx(ce_r(curves.bezier(p_o, theta_c, p_p, t)),
                                                 rel=1e-4)
        seen.add(t < 0.5)
    assert seen == {True, False}  # both segments were drawn
    with pytest.raises(ValueError, match="curve must be one of"):
        MCUConfig(curve="spline")


@pytest.mark.parametrize("curve,dtype", [("bezier", "float32"), ("polychain", "float32"),
                                         ("bezier", "bfloat16")])
def test_the_packed_update_is_the_gradient_through_the_curve(curve, dtype, theta_o, theta_p,
                                                             digits_images, digits_split,
                                                             small_model):
    """The step packs theta_c's trained tensors (one vector per dtype) and scales the
    packed gradient of theta(t) by the control point's weight: one SGD step equals theta_c
    minus lr times the gradient through the curve, taken independently by autodiff of the
    per-tensor curve; the frozen tensors stay as they were. Also for a bfloat16 model, whose
    kernels the step forms in bfloat16 (where the model casts float32 ones as it uses them;
    XLA rounds the two bfloat16 programs differently: the updates differ by up to 1.4e-4,
    as they did before the step formed its kernels in bfloat16)."""
    from mcu_jax.data.transforms import normalize

    train_images, _ = digits_images
    small_model = small_model.clone(dtype=dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-3,
                                                                          "atol": 5e-4}
    config = MCUConfig(progress=False, curve=curve, beta_mode="fixed", beta=0.3, lr=0.5)
    is_forget = np.zeros(train_images.num_examples, bool)
    is_forget[digits_split.forget] = True
    p_o, p_p = theta_o["params"], theta_p["params"]
    theta_c = jax.tree.map(lambda a, b: 0.3 * a + 0.5 * b + 0.05, p_o, p_p)
    flat = pytrees.flatten(p_o)
    frozen = sorted(flat)[::2]  # every other tensor frozen
    mask = pytrees.unflatten(p_o, {k: k not in frozen for k in flat})
    state, consts, _ = mcu.setup_curve(small_model, theta_o, theta_p, theta_c, mask,
                                       train_images, is_forget, (99.0, 95.0), config)
    # Trained and frozen tensors of both parts (vectors: BatchNorm scales, offsets, biases)
    assert set(state.trainable) == set(mcu.PARTS)
    for part in state.trainable.values():
        (key,) = part  # one dtype: "float32:<fingerprint of the packed tensors>"
        assert key.startswith("float32:") and part[key].ndim == 1
    assert all(np.size(v) for part in consts.points.values() for group in part.values()
               for p in group for v in p.values())
    # Filters held output-channel first (mcu.FILTER_ORDER): here conv0 frozen, conv1 trained
    assert consts.filters == {"conv0/kernel", "conv1/kernel"}
    where = mcu.curve_layouts(p_o, consts.frozen, consts.filters)
    trained_tensors = where["trained"]["tensors"]
    assert dict(zip(trained_tensors.paths, trained_tensors.shapes,
                    strict=True))["conv1/kernel"] == (64, 3, 3, 32)
    frozen_tensors = where["frozen"]["tensors"]
    held = packing.unpack(frozen_tensors, consts.points["tensors"]["frozen"][1])  # theta_c's
    np.testing.assert_array_equal(held["conv0/kernel"],
                                  np.transpose(theta_c["conv0"]["kernel"], (3, 0, 1, 2)))
    assert consts.frozen == set(frozen)
    tx = optax.sgd(config.lr)
    step = jax.jit(mcu.make_curve_step(small_model, tx, config, p_o))
    mixed = jnp.asarray(np.concatenate([digits_split.retain_subset[:96],
                                        digits_split.forget[:32]]), jnp.int32)
    x = normalize(train_images.x[mixed], train_images.mean, train_images.std)
    before = pytrees.flatten(theta_c)
    sides = set()
    for seed in range(6):  # several t: both pieces of the polygonal chain
        new, m = step(state, consts, mixed, jax.random.PRNGKey(seed))
        sides.add(float(m["t"]) < 0.5)

        def loss(c, t=m["t"]):
            params = curves.point(curve, [p_o, c, p_p], t)
            logits, _ = small_model.apply({"params": params,
                                           "batch_stats": theta_o["batch_stats"]},
                                          x, train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, train_images.y[mixed])
            return ce[:96].mean() - 0.3 * ce[96:].mean()

        grad = pytrees.flatten(jax.grad(loss)(theta_c))
        got = pytrees.flatten(mcu.control_point(p_o, new.trainable, consts))
        for k in flat:
            want = before[k] if k in frozen else before[k] - config.lr * grad[k]
            np.testing.assert_allclose(got[k], want, **tolerance, err_msg=k)
            if k in frozen:
                assert np.array_equal(got[k], before[k]), k
    assert sides == {True, False}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_curve_point_kernel_steps_as_xla_does(dtype, theta_o, theta_p, digits_images,
                                                  digits_split, small_model):
    """With the curve point's tensors formed by ``combine``'s kernel (interpreted), trained
    and frozen ones, a step gives what it gives with XLA's sums, bit for bit."""
    train_images, _ = digits_images
    small_model = small_model.clone(dtype=dtype)
    is_forget = np.zeros(train_images.num_examples, bool)
    is_forget[digits_split.forget] = True
    p_o = theta_o["params"]
    flat = pytrees.flatten(p_o)
    mask = pytrees.unflatten(p_o, {k: i % 2 == 0 for i, k in enumerate(flat)})
    idx = jnp.asarray(np.concatenate([digits_split.retain_subset[:40],
                                      digits_split.forget[:24]]), jnp.int32)
    steps = []
    for combine in ("xla", "interpret"):
        config = MCUConfig(progress=False, combine=combine)
        theta_c = curves.midpoint(p_o, theta_p["params"])
        state, consts, _ = mcu.setup_curve(small_model, theta_o, theta_p, theta_c, mask,
                                           train_images, is_forget, (99.0, 95.0), config)
        step = jax.jit(mcu.make_curve_step(small_model, optax.sgd(config.lr), config, p_o))
        steps.append(step(state, consts, idx, jax.random.PRNGKey(3)))
    for a, b in zip(jax.tree.leaves(steps[0]), jax.tree.leaves(steps[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="combine must be one of"):
        MCUConfig(combine="triton")


def test_fixed_beta_mode_uses_its_beta(theta_o, theta_p, digits_images, digits_split,
                                       small_model):
    train_images, _ = digits_images
    config = MCUConfig(epochs=1, beta_mode="fixed", beta=0.3, progress=False)
    result = _train(small_model, theta_o, theta_p, train_images, digits_split, config,
                    jax.random.PRNGKey(0))
    assert result.history[0]["beta_mean"] == pytest.approx(0.3)


def test_curve_training_resumes_identically(tmp_path, theta_o, theta_p, digits_images,
                                            digits_split, small_model):
    train_images, _ = digits_images
    config = MCUConfig(epochs=3, progress=False, steps_per_call=2)
    key = jax.random.PRNGKey(4)
    straight = _train(small_model, theta_o, theta_p, train_images, digits_split, config, key)
    _train(small_model, theta_o, theta_p, train_images, digits_split, config, key,
           checkpoint_dir=tmp_path / "curve")
    shutil.rmtree(tmp_path / "curve" / "3")  # killed during the last epoch
    resumed = _train(small_model, theta_o, theta_p, train_images, digits_split, config, key,
                     checkpoint_dir=tmp_path / "curve")
    for a, b in zip(jax.tree.leaves(straight.theta_c), jax.tree.leaves(resumed.theta_c),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == straight.history
    # Epoch 2 was timed before the kill; epoch 3 restored the checkpoint and compiled.
    assert len(straight.epoch_seconds) == 2 and len(resumed.epoch_seconds) == 1
    finished = _train(small_model, theta_o, theta_p, train_images, digits_split, config, key,
                      checkpoint_dir=tmp_path / "curve")  # nothing left to train
    assert finished.epoch_seconds == resumed.epoch_seconds
    assert finished.history == straight.history


def test_a_checkpoint_of_another_mask_is_refused(tmp_path, theta_o, theta_p, digits_images,
                                                 digits_split, small_model):
    """theta_c's trained tensors are packed into one vector per dtype: a checkpoint saved
    with another mask of the same size must not be loaded into it (the vectors' keys
    fingerprint the packed tensors), and the message says what may have changed."""
    train_images, _ = digits_images
    flat = pytrees.flatten(theta_o["params"])
    by_shape: dict = {}
    for path, value in flat.items():
        by_shape.setdefault(value.shape, []).append(path)
    first, second = next(paths[:2] for paths in by_shape.values() if len(paths) > 1)
    config = MCUConfig(epochs=2, progress=False)
    one = pytrees.unflatten(theta_o["params"], {k: k == first for k in flat})
    other = pytrees.unflatten(theta_o["params"], {k: k == second for k in flat})
    _train(small_model, theta_o, theta_p, train_images, digits_split,
           MCUConfig(epochs=1, progress=False), jax.random.PRNGKey(0), mask=one,
           checkpoint_dir=tmp_path / "curve")
    with pytest.raises(runs.RequestMismatch, match="mask"):  # the folder's record says so
        _train(small_model, theta_o, theta_p, train_images, digits_split, config,
               jax.random.PRNGKey(0), mask=other, checkpoint_dir=tmp_path / "curve")
    (tmp_path / "curve" / "run.json").unlink()  # as a folder written before the record
    with pytest.raises(ValueError, match=r"does not fit this run's state \(another model, "
                                         r"optimiser or mask, or a state saved by another "
                                         r"version of mcu-jax\?\): .*float32:"):
        _train(small_model, theta_o, theta_p, train_images, digits_split, config,
               jax.random.PRNGKey(0), mask=other, checkpoint_dir=tmp_path / "curve")


def test_curve_training_rejects_bad_input(theta_o, theta_p, digits_images, digits_split,
                                          small_model):
    train_images, _ = digits_images
    config = MCUConfig(epochs=1, progress=False)
    with pytest.raises(ValueError, match="forget set"):
        mcu.train_curve(small_model, theta_o, theta_p, train_images, digits_split.retain_subset,
                        np.array([], int), REFS, config, jax.random.PRNGKey(0))
    none = jax.tree.map(lambda _: False, theta_o["params"])
    with pytest.raises(ValueError, match="selects no tensor"):
        _train(small_model, theta_o, theta_p, train_images, digits_split, config,
               jax.random.PRNGKey(0), mask=none)
    bad = {"params": {**theta_p["params"]}, "batch_stats": theta_p["batch_stats"]}
    first = sorted(bad["params"])[0]
    bad["params"][first] = jax.tree.map(lambda a: a[..., :1], bad["params"][first])
    with pytest.raises(ValueError, match=first):
        _train(small_model, theta_o, bad, train_images, digits_split, config,
               jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="beta_mode"):
        MCUConfig(beta_mode="sometimes")
    # Another model's variables and an int seed for a key: refused up front, named
    other = models.init_variables(models.create("resnet20", 10), jax.random.PRNGKey(0),
                                  (1, 8, 8, 1))
    with pytest.raises(ValueError, match="theta_p"):
        _train(small_model, theta_o, other, train_images, digits_split, config,
               jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="key must be a JAX random key"):
        _train(small_model, theta_o, theta_p, train_images, digits_split, config, 0)
    for field, value in (("beta", -3.0), ("beta_values", (0.0, -1.0, 0.5)), ("augment", "no"),
                         ("progress", 1)):
        with pytest.raises(ValueError, match=field):
            MCUConfig(**{field: value})
    with pytest.raises(ValueError, match=r"paper_config: unknown field\(s\) 'epoch'"):
        mcu.paper_config("random", epoch=3)


def test_a_checkpoint_folder_resumes_only_its_own_training(tmp_path, theta_o, theta_p,
                                                            digits_images, digits_split,
                                                            small_model):
    """A resume with other end points, hyperparameters, curve or key is refused, naming
    what differs, instead of continuing the first curve's checkpoints; speed settings may
    change."""
    train_images, _ = digits_images
    base, key, folder = MCUConfig(epochs=1, progress=False), jax.random.PRNGKey(0), tmp_path
    _train(small_model, theta_o, theta_p, train_images, digits_split, base, key,
           checkpoint_dir=folder)
    for changed, field in (((theta_o, theta_o, base, key), "theta_p"),
                           ((theta_o, theta_p, dataclasses.replace(base, lr=0.02), key), "lr"),
                           ((theta_o, theta_p, dataclasses.replace(base, curve="polychain"),
                             key), "curve"),
                           ((theta_o, theta_p, base, jax.random.PRNGKey(1)), "key")):
        with pytest.raises(runs.RequestMismatch, match=field):
            _train(small_model, changed[0], changed[1], train_images, digits_split,
                   *changed[2:], checkpoint_dir=folder)
    again = _train(small_model, theta_o, theta_p, train_images, digits_split,
                   dataclasses.replace(base, steps_per_call=3, checkpoint_every=2), key,
                   checkpoint_dir=folder)
    assert len(again.history) == 1


def test_frozen_vectors_of_names_that_sort_otherwise_as_strings(digits_images, digits_split):
    """The step lays out the frozen vectors in the params' tree order, not in the order of
    the frozen dict's keys, which jit sorts as strings ("bn-2/..." before "bn/...")."""
    from tiny_models import TwoBN

    train_images, _ = digits_images
    model = TwoBN()
    theta_o, theta_p = (models.init_variables(model, jax.random.PRNGKey(i), (1, 8, 8, 1))
                        for i in (0, 1))
    flat = pytrees.flatten(theta_o["params"])
    frozen = {"bn/bias", "bn-2/scale", "middle/bias", "hidden/kernel"}
    mask = pytrees.unflatten(theta_o["params"], {k: k not in frozen for k in flat})
    result = _train(model, theta_o, theta_p, train_images, digits_split,
                    MCUConfig(epochs=1, progress=False), jax.random.PRNGKey(0), mask=mask)
    start = pytrees.flatten(curves.midpoint(theta_o["params"], theta_p["params"]))
    got = pytrees.flatten(result.theta_c)
    assert all(np.array_equal(got[k], start[k]) for k in frozen)
    assert not np.array_equal(got["bn/scale"], start["bn/scale"])


@pytest.mark.parametrize("field", ["epochs", "batch_size"])
def test_config_integers_refuse_booleans(field):
    """True is an int to Python; as a count of epochs or a batch size it is a mistake."""
    with pytest.raises(ValueError, match=rf"{field} must be an int"):
        MCUConfig(**{field: True})


def test_filters_are_stored_output_channel_first_and_restored():
    """``mcu.stored`` puts the filters' axes in FILTER_ORDER (HWIO -> OHWI) and leaves the
    other tensors; ``restored`` undoes it, for arrays and shape structs alike."""
    w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = {"conv/kernel": jnp.asarray(w), "dense/kernel": jnp.ones((4, 6)),
            "other/kernel": jnp.ones((1, 1, 2, 3))}
    filters = frozenset({"conv/kernel"})
    held = mcu.stored(flat, filters)
    assert held["conv/kernel"].shape == (5, 2, 3, 4)
    assert float(held["conv/kernel"][4, 1, 2, 3]) == w[1, 2, 3, 4]
    assert held["dense/kernel"] is flat["dense/kernel"]
    assert held["other/kernel"] is flat["other/kernel"]  # 4-d, but not a filter
    back = mcu.restored(held, filters)
    assert all(np.array_equal(back[k], flat[k]) for k in flat)
    shapes = mcu.stored(jax.eval_shape(lambda: flat), filters)
    assert shapes["conv/kernel"] == jax.ShapeDtypeStruct((5, 2, 3, 4), jnp.float32)


def test_another_pointwise_setting_packs_other_filters(digits_images):
    """PreResNet's 1x1 kernels are filters under pointwise="conv" and matrices under the
    kernel: curve training packs them in another order, so the packed state's key (which
    fingerprints the packed shapes) differs, and a checkpoint of one does not fit the
    other's state (``loop.run_epochs`` refuses a state of another structure)."""
    train_images, _ = digits_images
    states = {}
    for pointwise in ("conv", "interpret"):
        model = models.create("preresnet110", 10, depth=11, pointwise=pointwise)
        theta = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
        mask = jax.tree.map(lambda _: True, theta["params"])
        state, consts, _ = mcu.setup_curve(
            model, theta, theta, theta["params"], mask, train_images,
            np.zeros(train_images.num_examples, bool), (99.0, 95.0), MCUConfig(progress=False))
        states[pointwise] = (state, consts)
    (conv, c_conv), (kernel, c_kernel) = states["conv"], states["interpret"]
    assert c_kernel.filters < c_conv.filters  # the 1x1 matrices are not filters
    assert "stage1_block0/conv1/kernel" in c_conv.filters - c_kernel.filters
    assert set(conv.trainable["tensors"]) != set(kernel.trainable["tensors"])
    assert conv.trainable["vectors"].keys() == kernel.trainable["vectors"].keys()
