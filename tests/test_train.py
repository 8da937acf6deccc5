"""Ordinary training, evaluation and checkpoints on the digits set with a small CNN."""

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcu_jax import checkpoint, evaluation, loop, train
from mcu_jax.data import Images
from mcu_jax.models import init_variables


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_training_reduces_loss(digits, digits_images, small_model):
    train_images, _ = digits_images
    pool = np.arange(digits.num_train)
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    before = evaluation.outputs(small_model, v0, train_images, pool)["loss"].mean()
    config = train.TrainConfig(epochs=2, lr=0.05, progress=False)
    v1, history = train.fit(small_model, v0, train_images, pool, config, jax.random.PRNGKey(1))
    after = evaluation.outputs(small_model, v1, train_images, pool)["loss"].mean()
    assert after < 0.5 * before
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in history)
    # fit must not consume (donate) the caller's arrays.
    assert np.isfinite(np.asarray(jax.tree.leaves(v0)[0])).all()


def test_reference_accuracies_in_percent(theta_o, digits_images, digits_split, small_model):
    train_images, test_images = digits_images
    refs = train.reference_accuracies(small_model, theta_o, train_images, test_images, digits_split)
    assert set(refs) == {"train", "val", "test"}
    assert all(50.0 < v <= 100.0 for v in refs.values())
    # Acc_o(D_train) is over the whole training set (D_r and D_f), D_v and D_t over the test set.
    for name, images, idx in (("train", train_images, np.arange(train_images.num_examples)),
                              ("val", test_images, digits_split.val),
                              ("test", test_images, digits_split.test)):
        correct = evaluation.outputs(small_model, theta_o, images, idx)["correct"]
        assert refs[name] == pytest.approx(100.0 * correct.mean(), abs=1e-4), name


def test_accuracy_matches_numpy(theta_o, digits, digits_images, small_model):
    train_images, _ = digits_images
    idx = np.arange(0, digits.num_train, 3)  # not a multiple of the batch size
    out = evaluation.outputs(small_model, theta_o, train_images, idx, batch_size=64)
    x = (digits.x_train[idx] / 255.0 - np.array(digits.mean)) / np.array(digits.std)
    logits = small_model.apply(theta_o, jnp.asarray(x, jnp.float32), train=False)
    expected = np.asarray(jnp.argmax(logits, -1)) == digits.y_train[idx]
    np.testing.assert_array_equal(out["correct"], expected.astype(np.float32))


def test_train_model_reuses_only_the_same_request(tmp_path, digits, digits_images,
                                                  small_model):
    """A finished model is returned again for the same request (speed-only settings may
    change), and another request for the same folder is refused, not answered with it."""
    train_images, _ = digits_images
    pool = np.arange(256)
    config = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    args = (small_model, train_images, pool)
    first, meta = train.train_model(*args, config, jax.random.PRNGKey(0), (1, 8, 8, 1),
                                    tmp_path, metadata={"seed": 0})
    faster = train.TrainConfig(epochs=1, lr=0.05, progress=True, steps_per_call=7)
    again, _ = train.train_model(*args, faster, jax.random.PRNGKey(0), (1, 8, 8, 1), tmp_path,
                                 metadata={"seed": 0})
    assert _leaves_equal(first, again)
    for change, match in (
        (dict(config=train.TrainConfig(epochs=2, lr=0.05, progress=False)), "epochs is 1"),
        (dict(key=jax.random.PRNGKey(1)), "key"),
        (dict(pool=np.arange(128)), "pool"),
        (dict(metadata={"seed": 1}), "seed"),
    ):
        call = dict(config=config, key=jax.random.PRNGKey(0), pool=pool, metadata={"seed": 0})
        call.update(change)
        with pytest.raises(ValueError, match=match):
            train.train_model(small_model, train_images, call["pool"], call["config"],
                              call["key"], (1, 8, 8, 1), tmp_path, metadata=call["metadata"])
    with pytest.raises(ValueError, match="model"):  # another model (here its dtype)
        train.train_model(small_model.clone(dtype="bfloat16"), *args[1:], config,
                          jax.random.PRNGKey(0), (1, 8, 8, 1), tmp_path, metadata={"seed": 0})


def test_model_checkpoint_round_trip(tmp_path, theta_o):
    checkpoint.save_model(tmp_path / "m", theta_o, {"refs": {"train": 99.5}, "seed": 3})
    assert checkpoint.model_exists(tmp_path / "m")
    restored, meta = checkpoint.load_model(tmp_path / "m")
    assert _leaves_equal(restored, theta_o)
    assert jax.tree.structure(restored) == jax.tree.structure(theta_o)
    assert meta == {"refs": {"train": 99.5}, "seed": 3}
    with pytest.raises(FileNotFoundError, match="no finished model"):
        checkpoint.load_model(tmp_path / "missing")


def test_interrupted_training_resumes_identically(tmp_path, digits, digits_images, small_model):
    train_images, _ = digits_images
    pool = np.arange(0, digits.num_train, 2)
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    config = train.TrainConfig(epochs=3, lr=0.05, progress=False, steps_per_call=2)
    key = jax.random.PRNGKey(7)
    straight, hist = train.fit(small_model, v0, train_images, pool, config, key)
    ckpt_dir = tmp_path / "progress"
    train.fit(small_model, v0, train_images, pool, config, key, checkpoint_dir=ckpt_dir)
    # Simulate a kill during epoch 3: only the epoch-2 checkpoint survives.
    shutil.rmtree(ckpt_dir / "3")
    resumed, hist2 = train.fit(
        small_model, v0, train_images, pool, config, key, checkpoint_dir=ckpt_dir
    )
    assert _leaves_equal(straight, resumed)
    assert [h["epoch"] for h in hist2] == [1, 2, 3]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, digits, digits_images,
                                                           small_model):
    train_images, _ = digits_images
    pool = np.arange(digits.num_train)
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    ckpt_dir = tmp_path / "progress"
    one = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    train.fit(small_model, v0, train_images, pool, one, jax.random.PRNGKey(1),
              checkpoint_dir=ckpt_dir)

    def nan_loss(logits, labels, aux, key):
        loss, metrics = train.cross_entropy_loss(logits, labels, aux, key)
        return loss * jnp.nan, {**metrics, "loss": loss * jnp.nan}

    two = train.TrainConfig(epochs=2, lr=0.05, progress=False)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 1\d"):
        train.fit(small_model, v0, train_images, pool, two, jax.random.PRNGKey(1),
                  loss_fn=nan_loss, checkpoint_dir=ckpt_dir)
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 1


def test_update_mask_freezes_weights_exactly(digits, digits_images, small_model, theta_o):
    train_images, _ = digits_images
    mask = jax.tree.map(lambda p: (np.arange(p.size) % 2 == 0).reshape(p.shape),
                        theta_o["params"])
    config = train.TrainConfig(epochs=2, lr=0.05, weight_decay=5e-3, progress=False)
    out, _ = train.fit(small_model, theta_o, train_images, np.arange(digits.num_train), config,
                       jax.random.PRNGKey(2), update_mask=mask)
    for before, after, m in zip(jax.tree.leaves(theta_o["params"]),
                                jax.tree.leaves(out["params"]), jax.tree.leaves(mask),
                                strict=True):
        np.testing.assert_array_equal(np.asarray(after)[~m], np.asarray(before)[~m])
    changed = [np.any(np.asarray(a) != np.asarray(b)) for a, b in
               zip(jax.tree.leaves(theta_o["params"]), jax.tree.leaves(out["params"]), strict=True)]
    assert any(changed)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule"):
        train.TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="batch_size"):
        train.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        train.TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1, got 0"):
        train.TrainConfig(checkpoint_every=0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            train.TrainConfig(lr=bad)


@pytest.mark.parametrize("field, value", [
    ("epochs", 1.5), ("epochs", "3"), ("epochs", True), ("epochs", -1),
    ("batch_size", 64.0), ("batch_size", 0), ("lr", "0.1"), ("lr", 0.0),
    ("momentum", "0.9"), ("momentum", 1.0), ("weight_decay", -1e-4),
    ("weight_decay", float("nan")), ("schedule", "step"), ("steps_per_call", 2.0),
    ("progress", "no"), ("progress", 1), ("checkpoint_every", 1.5),
])
def test_train_config_names_a_bad_field_and_its_value(field, value):
    """Every field is checked when the config is made (a float epoch count used to pass
    until the training loop, after train_model had bound its folder; a string rate gave a
    raw TypeError): one ValueError naming the field and the value."""
    with pytest.raises(ValueError, match=rf"^{field} must .*, got {re.escape(repr(value))}$"):
        train.TrainConfig(**{field: value})


def test_train_config_stores_plain_numbers():
    config = train.TrainConfig(epochs=np.int64(2), batch_size=np.int32(8), lr=1,
                               momentum=np.float32(0.5), weight_decay=0)
    assert config == train.TrainConfig(epochs=2, batch_size=8, lr=1.0, momentum=0.5,
                                       weight_decay=0.0)
    assert type(config.epochs) is int and type(config.lr) is float
    json.dumps(dataclasses.asdict(config))  # what train_model records in run.json


def test_epoch_cosine_is_torchs_cosine_annealing_stepped_per_epoch():
    """"cosine_epoch": constant within an epoch, lr (1 + cos(pi e / E)) / 2 in epoch e, as
    torch's CosineAnnealingLR(T_max=E) stepped once per epoch (the release's baselines)."""
    import math

    lr, epochs, per_epoch = 0.01, 5, 7
    schedule = train.epoch_cosine_schedule(lr, epochs, per_epoch)
    for step in range(epochs * per_epoch):
        e = step // per_epoch
        want = lr * (1 + math.cos(math.pi * e / epochs)) / 2
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6), step
    assert float(schedule(0)) == pytest.approx(lr)
    assert float(schedule(per_epoch * 4)) == pytest.approx(0.01 * (1 + math.cos(0.8 * math.pi)) / 2)
    config = train.TrainConfig(epochs=epochs, lr=lr, schedule="cosine_epoch", momentum=0.0,
                               weight_decay=0.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train.make_optimizer(config, 35)
    # The optimiser applies it: plain SGD's update is -lr(step) * gradient.
    tx = train.make_optimizer(config, 35, steps_per_epoch=per_epoch)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for step in range(epochs * per_epoch):
        update, state = tx.update({"w": jnp.ones(2)}, state, params)
        assert float(-update["w"][0]) == pytest.approx(float(schedule(step)), rel=1e-6)


def test_empty_pool_is_rejected(digits_images, small_model, theta_o):
    train_images, _ = digits_images
    with pytest.raises(ValueError, match="empty"):
        train.fit(small_model, theta_o, train_images, np.array([], int),
                  train.TrainConfig(epochs=1, progress=False), jax.random.PRNGKey(0))


def test_scanned_and_unrolled_runners_agree(digits, digits_images, small_model, theta_o):
    train_images, _ = digits_images
    config = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    tx = train.make_optimizer(config, 10)
    step = train.make_step(small_model, train.cross_entropy_loss, tx)
    batches = jnp.arange(3 * 64).reshape(3, 64)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    outs = []
    for unrolled in (True, False):
        state = train.TrainState(theta_o["params"], theta_o["batch_stats"],
                                 tx.init(theta_o["params"]))
        state = jax.tree.map(jnp.array, state)
        runner = loop.make_runner(step, unrolled=unrolled)
        outs.append(runner(state, (train_images, None), batches, keys))
    (s1, m1), (s2, m2) = outs
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


@pytest.mark.parametrize("steps, per_call, expected", [
    (214, 50, 43), (7, 2, 2), (100, 50, 50), (3, 50, 3), (1, 1, 1), (51, 50, 26),
])
def test_call_length_spreads_an_epoch_evenly(steps, per_call, expected):
    length = loop.call_length(steps, per_call)
    assert length == expected and length <= per_call
    calls = -(-steps // length)
    assert calls * length - steps < calls  # less than one padding step per call


def _counting_step():
    """A cheap order-sensitive step, and the number of times it was traced (compiled)."""
    traces = [0]

    def step(state, consts, idx, key):
        traces[0] += 1
        new = state * 1.5 + jnp.sum(consts[idx]) * jax.random.uniform(key)
        return new, {"loss": new}

    return step, traces


def test_one_compiled_program_per_run_and_padding_changes_nothing():
    consts = jnp.arange(40.0)
    pool = np.arange(40)  # batch 4: 10 steps per epoch, calls of 4 -> 4, 4, 2 (+2 padding)
    config = loop.LoopConfig(epochs=2, batch_size=4, steps_per_call=4, progress=False)
    key = jax.random.PRNGKey(0)
    step, traces = _counting_step()
    scanned, history = loop.run_epochs(loop.make_runner(step, unrolled=False), jnp.float32(1),
                                       consts, pool, key, config)
    assert traces[0] == 1  # the short last call reused the program of the full ones
    unrolled, history_u = loop.run_epochs(loop.make_runner(step, unrolled=True),
                                          jnp.float32(1), consts, pool, key, config)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-6)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in history_u],
                               rtol=1e-6)
    # A padded call: only the valid steps count.
    runner = loop.make_runner(_counting_step()[0], unrolled=False)
    batches = jnp.arange(20).reshape(5, 4)
    keys = jax.random.split(key, 5)
    full, m_full = runner(jnp.float32(1), consts, batches[:3], keys[:3])
    padded, m_pad = runner(jnp.float32(1), consts, batches, keys, 3)
    np.testing.assert_allclose(padded, full, rtol=1e-6)
    np.testing.assert_allclose(m_pad["loss"][:3], m_full["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="n_valid"):
        runner(jnp.float32(1), consts, batches, keys, 6)


def test_checkpoint_interval_is_configurable(tmp_path, digits, digits_images, small_model):
    train_images, _ = digits_images
    pool = np.arange(0, digits.num_train, 4)
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    config = train.TrainConfig(epochs=3, lr=0.05, progress=False, checkpoint_every=2)
    key = jax.random.PRNGKey(3)
    straight, _ = train.fit(small_model, v0, train_images, pool, config, key,
                            checkpoint_dir=tmp_path / "p")
    assert sorted(int(p.name) for p in (tmp_path / "p").iterdir() if p.name.isdigit()) == [2, 3]
    shutil.rmtree(tmp_path / "p" / "3")  # killed in epoch 3: resume from epoch 2
    resumed, _ = train.fit(small_model, v0, train_images, pool, config, key,
                           checkpoint_dir=tmp_path / "p")
    assert _leaves_equal(straight, resumed)
    with pytest.raises(ValueError, match="checkpoint_every"):
        loop.LoopConfig(epochs=1, checkpoint_every=0)


def test_sgd_with_weight_decay_momentum_and_epoch_cosine_is_torchs_sgd():
    """make_optimizer against torch.optim.SGD's rule written out by hand: d = g + wd p,
    buf = mu buf + d (buf = d at the first step), p -= lr_e buf, lr_e the per-epoch cosine."""
    import math

    lr, wd, mu, epochs, per_epoch = 0.1, 0.05, 0.9, 3, 2
    config = train.TrainConfig(epochs=epochs, lr=lr, momentum=mu, weight_decay=wd,
                               schedule="cosine_epoch")
    tx = train.make_optimizer(config, epochs * per_epoch, steps_per_epoch=per_epoch)
    rng = np.random.default_rng(0)
    p = rng.normal(size=4)
    params = {"w": jnp.asarray(p, jnp.float32)}
    state, buf = tx.init(params), np.zeros(4)
    for step in range(epochs * per_epoch):
        g = rng.normal(size=4)
        d = g + wd * p
        buf = mu * buf + d if step else d
        p = p - lr * (1 + math.cos(math.pi * (step // per_epoch) / epochs)) / 2 * buf
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-6)


def _linear_problem(n: int):
    """A one-output linear model on ``n`` blank images and a loss whose gradient in the bias
    is 1, so that plain SGD moves the bias by exactly -lr_s at step s."""
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(1)(x.reshape(x.shape[0], -1))

    images = Images.from_arrays(np.zeros((n, 2, 2, 1), np.uint8), np.zeros(n, np.int32),
                                (0.5,), (0.25,))
    model = Linear()
    v0 = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), train=False)

    def loss(logits, labels, aux, key):
        return logits.mean(), {"loss": logits.mean()}

    return model, v0, images, loss


def test_fit_anneals_the_step_cosine_over_every_step_of_the_run():
    """The per-step cosine runs over epochs x floor(n / batch) steps (the dropped partial
    batch is not a step): 44 images in batches of 8 are 5 steps per epoch, 15 in all."""
    import math

    model, v0, images, loss = _linear_problem(44)
    config = train.TrainConfig(epochs=3, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0,
                               schedule="cosine", progress=False)
    out, _ = train.fit(model, v0, images, np.arange(44), config, jax.random.PRNGKey(1),
                       loss_fn=loss)
    want = -sum(0.1 * (1 + math.cos(math.pi * s / 15)) / 2 for s in range(15))
    moved = out["params"]["Dense_0"]["bias"] - v0["params"]["Dense_0"]["bias"]
    np.testing.assert_allclose(moved, [want], rtol=1e-5)


def test_epoch_history_averages_every_chunk_of_the_epoch():
    """An epoch run in several calls (steps_per_call below the steps per epoch) records the
    mean over all of its steps, as the same epoch run in one call does."""
    model, v0, images, loss = _linear_problem(48)
    histories = []
    for per_call in (2, 50):
        config = train.TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.0,
                                   weight_decay=0.0, progress=False, steps_per_call=per_call)
        histories.append(train.fit(model, v0, images, np.arange(48), config,
                                   jax.random.PRNGKey(1), loss_fn=loss)[1])
    for chunked, whole in zip(*histories, strict=True):
        assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_an_infinite_loss_stops_training_too(digits, digits_images, small_model):
    train_images, _ = digits_images
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))

    def inf_loss(logits, labels, aux, key):
        loss, metrics = train.cross_entropy_loss(logits, labels, aux, key)
        return loss + jnp.inf, {**metrics, "loss": loss + jnp.inf}

    config = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    # No checkpoint folder: the message says nothing is kept (not "the last good checkpoint")
    with pytest.raises(loop.NonFiniteLossError, match="at step 0.*nothing is kept"):
        train.fit(small_model, v0, train_images, np.arange(digits.num_train), config,
                  jax.random.PRNGKey(1), loss_fn=inf_loss)


def test_train_model_minutes_include_earlier_sessions(monkeypatch, tmp_path, digits,
                                                      digits_images, small_model):
    """A resumed theta_o / RT reports the time of the sessions before the resume too
    (loop.earlier_seconds of its progress folder), as methods and MCU do."""
    train_images, _ = digits_images
    monkeypatch.setattr(loop, "earlier_seconds", lambda directory: 600.0)
    config = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    _, meta = train.train_model(small_model, train_images, np.arange(64), config,
                                jax.random.PRNGKey(0), (8, 8, 1), tmp_path / "m")
    assert 10.0 <= meta["minutes"] < 11.0


def test_default_weight_decay_is_the_releases():
    """theta_o and RT (TrainConfig) decay weights by 1e-4, the authors' release's --wd."""
    assert train.TrainConfig().weight_decay == 1e-4


def test_fit_steps_the_epoch_cosine_once_per_epoch():
    """Through fit: a loss whose gradient in the bias is 1 moves the bias by -lr_e per step,
    so 5 steps per epoch over 3 epochs add up to -5 * sum_e lr_e."""
    import math

    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(1)(x.reshape(x.shape[0], -1))

    images = Images.from_arrays(np.zeros((40, 2, 2, 1), np.uint8), np.zeros(40, np.int32),
                                (0.5,), (0.25,))
    model = Linear()
    v0 = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), train=False)
    config = train.TrainConfig(epochs=3, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0,
                               schedule="cosine_epoch", progress=False)

    def loss(logits, labels, aux, key):
        return logits.mean(), {"loss": logits.mean()}

    out, _ = train.fit(model, v0, images, np.arange(40), config, jax.random.PRNGKey(1),
                       loss_fn=loss)
    want = -5 * sum(0.1 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3))
    moved = out["params"]["Dense_0"]["bias"] - v0["params"]["Dense_0"]["bias"]
    np.testing.assert_allclose(moved, [want], rtol=1e-5)


def test_per_sample_outputs_against_numpy():
    """Correctness, cross-entropy and the probability of the TRUE class (the MIA's feature),
    on logits whose argmax is not the label."""
    from mcu_jax.evaluation import per_sample_outputs

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.5, 0.0]], np.float32)
    labels = np.array([1, 2, 0])
    out = per_sample_outputs(jnp.asarray(logits), jnp.asarray(labels))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    true_p = p[np.arange(3), labels]
    np.testing.assert_allclose(out["prob"], true_p, rtol=1e-6)
    np.testing.assert_allclose(out["loss"], -np.log(true_p), rtol=1e-6)
    np.testing.assert_array_equal(out["correct"], [0.0, 1.0, 0.0])
