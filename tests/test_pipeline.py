"""MCU in one call on the digits set: curve, sweep, region, t*, exported model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import bn, checkpoint, curves, evaluation, masks, pipeline, pytrees, selection, train
from mcu_jax.mcu import MCUConfig

# Programs run_mcu used to compile once more for theta(t*) (BatchNorm pass, evaluation per
# set size); the t* sweep now does that work in one program of its own.
REMEASURE_PROGRAMS = ("batch_statistics", "_eval_chunk")


def _compiled_programs(fn):
    """``fn()`` and the names of the programs XLA compiled while it ran."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_run_mcu_end_to_end(tmp_path, monkeypatch, theta_o, theta_p, digits_images,
                            digits_split, small_model):
    train_images, test_images = digits_images
    refs = train.reference_accuracies(small_model, theta_o, train_images, test_images,
                                      digits_split)
    selection_config = pipeline.SelectionConfig(num_t=6)
    out, compiled = _compiled_programs(lambda: pipeline.run_mcu(
        small_model, theta_o, theta_p, train_images, test_images, digits_split, refs,
        jax.random.PRNGKey(0), MCUConfig(epochs=2, progress=False),
        pipeline.MaskConfig(k=0.5, k_r=0.1), selection_config, out_dir=tmp_path / "mcu",
    ))
    # Selection compiles at most two programs: the sweep over t and the sweep at t*.
    assert not [n for n in compiled if any(p in n for p in REMEASURE_PROGRAMS)], compiled
    assert sum("_sweep_chunk" in n for n in compiled) <= 2, compiled
    assert 0.75 <= out.t_star <= 1.0
    assert out.sweep.acc["forget"].shape == (6,)
    assert out.gaps.shape == (6,)
    for lo, hi in out.region:
        assert 0.0 <= lo <= hi <= 1.0
    assert set(out.measured) == {"retain", "forget", "test"}
    assert np.isfinite(out.measured_gap)
    assert set(out.minutes) == {"mask", "curve", "selection"}
    summary = json.loads((tmp_path / "mcu" / "mcu.json").read_text())
    assert summary["t_star"] == pytest.approx(out.t_star)
    # The chosen model is an ordinary checkpoint that evaluates like theta(t*).
    variables, meta = checkpoint.load_model(tmp_path / "mcu" / "model")
    assert meta["t_star"] == pytest.approx(out.t_star)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(out.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    # The trained control point is saved on its own, to study the curve later.
    saved, meta = checkpoint.load_model(tmp_path / "mcu" / "theta_c")
    assert meta == {"curve": "bezier"}
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(out.theta_c), strict=True):
        np.testing.assert_array_equal(a, b)
    # theta(t*) is the Bezier point at the float32 t*, its statistics those bn.recompute
    # finds, and ``measured`` what evaluate_sets measures of the exported variables.
    params = curves.bezier(theta_o["params"], out.theta_c, theta_p["params"],
                           np.float32(out.t_star))
    for a, b in zip(jax.tree.leaves(out.variables["params"]), jax.tree.leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    stats = bn.recompute(small_model, {"params": params, "batch_stats": theta_o["batch_stats"]},
                         train_images, digits_split.retain,
                         selection_config.bn_batch_size)["batch_stats"]
    for a, b in zip(jax.tree.leaves(out.variables["batch_stats"]), jax.tree.leaves(stats),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    sets = pipeline.eval_sets(train_images, test_images, digits_split)
    expected = evaluation.evaluate_sets(small_model, out.variables, sets,
                                        selection_config.eval_batch_size)
    assert set(out.measured) == set(expected)
    for name, value in expected.items():
        assert isinstance(out.measured[name], float)
        assert out.measured[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    # ... and ``measured_probs`` what evaluation.outputs gives for every sample (MIA's input).
    assert set(out.measured_probs) == set(sets)
    for name, (images, idx) in sets.items():
        probs = evaluation.outputs(small_model, out.variables, images, idx,
                                   selection_config.eval_batch_size)["prob"]
        np.testing.assert_allclose(out.measured_probs[name], probs, rtol=1e-5, atol=1e-6)
    # A second run reuses the cached mask, the finished curve checkpoint, the saved sweep and
    # the exported model: nothing is recomputed.
    def recomputed(*args, **kwargs):
        raise AssertionError("a finished part of run_mcu was recomputed")

    monkeypatch.setattr(pipeline.sweep, "sweep", recomputed)
    monkeypatch.setattr(pipeline.masks, "mask_gradients", recomputed)
    again = pipeline.run_mcu(  # (with the curve point's sums by XLA: a free setting)
        small_model, theta_o, theta_p, train_images, test_images, digits_split, refs,
        jax.random.PRNGKey(0), MCUConfig(epochs=2, progress=False, combine="xla"),
        selection_config=pipeline.SelectionConfig(num_t=6), out_dir=tmp_path / "mcu",
    )
    assert again.t_star == pytest.approx(out.t_star)
    np.testing.assert_allclose(again.gaps, out.gaps)
    assert again.measured == pytest.approx(out.measured)
    assert again.measured_probs is None  # loaded, not measured: callers evaluate it again
    # ... and reports the earlier session's seconds of the parts it reused (RTE of a resume).
    seconds = json.loads((tmp_path / "mcu" / "seconds.json").read_text())
    assert set(seconds) == {"mask", "sweep", "t_star"}
    assert 0 < seconds["mask"] <= 60 * out.minutes["mask"]
    assert 0 < seconds["sweep"] + seconds["t_star"] <= 60 * out.minutes["selection"]
    assert 60 * again.minutes["mask"] >= seconds["mask"]
    assert 60 * again.minutes["selection"] >= seconds["sweep"] + seconds["t_star"]
    # Another theta_p or key in the same folder is refused, not answered from the cache.
    for other in ({"theta_p": theta_o}, {"key": jax.random.PRNGKey(1)}):
        request = {"theta_p": theta_p, "key": jax.random.PRNGKey(0), **other}
        with pytest.raises(ValueError, match=f"{next(iter(other))}"):
            pipeline.run_mcu(
                small_model, theta_o, request["theta_p"], train_images, test_images,
                digits_split, refs, request["key"], MCUConfig(epochs=2, progress=False),
                selection_config=pipeline.SelectionConfig(num_t=6), out_dir=tmp_path / "mcu",
            )
    # Other settings in the same folder are refused (nothing of the first run is reused).
    with pytest.raises(ValueError, match=r"mask\.k is 0\.5 there but 0\.3 now"):
        pipeline.run_mcu(
            small_model, theta_o, theta_p, train_images, test_images, digits_split, refs,
            jax.random.PRNGKey(0), MCUConfig(epochs=2, progress=False),
            pipeline.MaskConfig(k=0.3, k_r=0.1), pipeline.SelectionConfig(num_t=6),
            out_dir=tmp_path / "mcu",
        )
    assert again.region == out.region


def test_config_validation():
    with pytest.raises(ValueError, match="k_r"):
        pipeline.MaskConfig(k_r=1.5)
    with pytest.raises(ValueError, match="num_t"):
        pipeline.SelectionConfig(num_t=3)
    with pytest.raises(ValueError, match="bn_set"):
        pipeline.SelectionConfig(bn_set="test")
    with pytest.raises(ValueError, match="interpolation.*'linear'"):
        pipeline.SelectionConfig(interpolation="linear")
    # A truthy string is not a switch: "no" would keep the test term, the mask on, ...
    for config, name in ((pipeline.SelectionConfig, "include_test"),
                         (pipeline.SelectionConfig, "precompile"),
                         (pipeline.SelectionConfig, "fold_bn"), (pipeline.MaskConfig, "enabled")):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            config(**{name: "no"})


def test_selection_uses_the_configured_interpolant(theta_o, theta_p, digits_images,
                                                   digits_split, small_model):
    """t* and the region come from the interpolant SelectionConfig names."""
    train_images, test_images = digits_images
    out = pipeline.run_mcu(
        small_model, theta_o, theta_p, train_images, test_images, digits_split,
        {"train": 99.0, "val": 90.0}, jax.random.PRNGKey(0), MCUConfig(epochs=1, progress=False),
        pipeline.MaskConfig(k=0.5, k_r=0.1),
        pipeline.SelectionConfig(num_t=6, t_lo=0.0, interpolation="pchip"),
    )
    ts = out.sweep.ts
    assert out.t_star == selection.optimal_t(ts, out.gaps, lo=0.0, kind="pchip")[0]
    assert [tuple(r) for r in out.region] == selection.effective_region(ts, out.gaps,
                                                                        kind="pchip")


def test_background_compilation_is_reused_and_changes_nothing(theta_o, theta_p, digits_images,
                                                              digits_split, small_model):
    train_images, test_images = digits_images
    refs = {"train": 100.0, "val": 95.0}
    # Shapes no other test uses, so every compile of these sweep programs is seen here (3
    # BatchNorm batches at once: the background thread compiles that program too).
    base = pipeline.SelectionConfig(num_t=5, bn_batch_size=50, eval_batch_size=77, bn_group=3)

    def run(precompile):
        return pipeline.run_mcu(
            small_model, theta_o, theta_p, train_images, test_images, digits_split, refs,
            jax.random.PRNGKey(1), MCUConfig(epochs=1, progress=False),
            pipeline.MaskConfig(enabled=False),
            dataclasses.replace(base, precompile=precompile),
        )

    early, compiled = _compiled_programs(lambda: run(True))
    # The thread compiled the sweep over t and the sweep at t*; the calls reused both.
    assert sum("_sweep_chunk" in n for n in compiled) == 2, compiled
    plain, compiled_again = _compiled_programs(lambda: run(False))
    assert not [n for n in compiled_again if "_sweep_chunk" in n], compiled_again
    assert early.t_star == plain.t_star and early.measured == plain.measured
    for name in early.sweep.acc:
        np.testing.assert_array_equal(early.sweep.acc[name], plain.sweep.acc[name])


def test_compute_mask_takes_retain_then_forget_gradients(monkeypatch, digits_split):
    """The mask's retain importance comes from D_r's gradient and its forget importance from
    D_f's: with rankings that disagree, swapping them would give another mask."""
    sizes = {"a": 10, "b": 20, "c": 30, "d": 40}
    rank = {"a": 1, "b": 2, "c": 3, "d": 4}  # retain: d > c > b > a; forget: a > b > c > d
    g_r = {n: np.full(s, rank[n] * np.sqrt(s), np.float32) for n, s in sizes.items()}
    g_f = {n: np.full(s, (5 - rank[n]) * np.sqrt(s), np.float32) for n, s in sizes.items()}
    seen = {}

    def fake(model, theta, images, retain, forget, batch_size, mesh, augment_key):
        seen.update(retain=retain, forget=forget, augment_key=augment_key)
        return g_r, g_f

    monkeypatch.setattr(pipeline.masks, "mask_gradients", fake)
    got = pipeline.compute_mask(None, {"params": g_r}, None, digits_split,
                                pipeline.MaskConfig(k=0.25, k_r=0.1))
    # k_r = 10 of 100 elements drops d (most retain-important); k = 25 keeps a, then b.
    assert got == {"a": True, "b": True, "c": False, "d": False}
    assert seen["retain"] is digits_split.retain and seen["forget"] is digits_split.forget
    assert seen["augment_key"] is None  # the images as stored
    # mask.augment: the training augmentation, drawn from the mask's seed
    pipeline.compute_mask(None, {"params": g_r}, None, digits_split,
                          pipeline.MaskConfig(augment=True, seed=7))
    np.testing.assert_array_equal(seen["augment_key"], jax.random.PRNGKey(7))
    # A budget that selects no tensor names mask.k and mask.k_r: k_r = 95 of 100 elements
    # drops every tensor here, which only the gradients tell ...
    with pytest.raises(ValueError, match=r"mask\.k=0\.25 and mask\.k_r=0\.95 selects no tensor"):
        pipeline.compute_mask(None, {"params": g_r}, None, digits_split,
                              pipeline.MaskConfig(k=0.25, k_r=0.95))
    # ... while k of no element, or k_r of all, are refused before any gradient.
    seen.clear()
    for cfg, words in ((pipeline.MaskConfig(k=0.0), r"mask\.k=0\.0 and mask\.k_r=0\.1"),
                       (pipeline.MaskConfig(k_r=1.0), r"mask\.k=0\.5 and mask\.k_r=1\.0"),
                       (pipeline.MaskConfig(k=0.009, kind="random"),
                        r"random mask with mask\.k=0\.009 \(kind='random'\) selects no")):
        with pytest.raises(ValueError, match=words):
            pipeline.compute_mask(None, {"params": g_r}, None, digits_split, cfg)
    assert not seen
    with pytest.raises(ValueError, match="augment must be True or False, got 'yes'"):
        pipeline.MaskConfig(augment="yes")
    for other in (dict(kind="random"), dict(enabled=False)):  # no gradients to augment
        with pytest.raises(ValueError, match="augment=True needs the gradient mask"):
            pipeline.MaskConfig(augment=True, **other)


def test_random_mask_kind_draws_the_budget_from_its_seed(theta_o, digits_split):
    """kind="random" is masks.random_mask of budget k from PRNGKey(seed), without any
    gradient (no model or images needed); k_r plays no part."""
    cfg = pipeline.MaskConfig(kind="random", k=0.3, k_r=0.9, seed=4)
    got = pipeline.compute_mask(None, theta_o, None, digits_split, cfg)
    assert got == masks.random_mask(theta_o["params"], 0.3, jax.random.PRNGKey(4))
    other = pipeline.compute_mask(None, theta_o, None, digits_split,
                                  dataclasses.replace(cfg, seed=5))
    assert other == masks.random_mask(theta_o["params"], 0.3, jax.random.PRNGKey(5))
    with pytest.raises(ValueError, match="kind must be one of .*'random'.*, got 'magic'"):
        pipeline.MaskConfig(kind="magic")
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        pipeline.MaskConfig(seed=-1)


def test_class_wise_references_of_beta_and_the_gap(monkeypatch, theta_o, theta_p,
                                                    digits_images, digits_split, small_model):
    """Class-wise, adaptive beta's forget reference is 0 and the gap's test term is D_tr."""
    from mcu_jax import mcu

    seen = {}
    setup = mcu.setup_curve

    def spy(*args, **kwargs):
        seen["refs"] = args[7]
        return setup(*args, **kwargs)

    monkeypatch.setattr(mcu, "setup_curve", spy)
    mcu.train_curve(small_model, theta_o, theta_p, digits_images[0],
                    digits_split.retain_subset[:64], digits_split.forget[:64],
                    {"train": 99.0, "val": 90.0}, MCUConfig(epochs=0, progress=False),
                    jax.random.PRNGKey(0), class_wise=True)
    assert seen["refs"] == (99.0, 0.0)
    acc = {"retain": 97.0, "forget": 10.0, "test": 80.0, "test_retain": 88.0}
    refs = {"train": 99.0, "val": 90.0}
    assert pipeline._gap(acc, refs, True, True) == pytest.approx((2 + 10 + 2) / 3)
    assert pipeline._gap(acc, refs, False, True) == pytest.approx((2 + 80 + 10) / 3)


def test_inputs_of_another_model_are_refused_up_front(monkeypatch, theta_o, theta_p,
                                                       digits_images, digits_split,
                                                       small_model):
    """Variables of another model, a mask that misses a tensor or is per element, float
    labels and an empty evaluation set are refused with the culprit named, before any work
    (before the mask phase here)."""
    from mcu_jax import mcu, methods, sweep
    from mcu_jax.data import Images
    from mcu_jax.models import create, init_variables

    train_images, test_images = digits_images
    refs = {"train": 99.0, "val": 95.0}

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(pipeline, "compute_mask", no_work)
    other = init_variables(create("resnet20", 10), jax.random.PRNGKey(0), (8, 8, 1))
    args = (train_images, test_images, digits_split, refs, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="theta_o"):
        pipeline.run_mcu(small_model, other, other, *args)
    with pytest.raises(ValueError, match="batch_stats"):
        pipeline.run_mcu(small_model, theta_o, {"params": theta_p["params"]}, *args)
    with pytest.raises(ValueError, match="look like fractions"):
        pipeline.run_mcu(small_model, theta_o, theta_p, train_images, test_images,
                         digits_split, {"train": 0.98, "val": 0.97}, jax.random.PRNGKey(0))
    # the sweep's 3x3 kernel needs the 1x1 kernel, the sweep's or the model's own
    pre = create("preresnet110", 10, depth=11)
    v = init_variables(pre, jax.random.PRNGKey(0), (8, 8, 1))
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        pipeline.run_mcu(pre, v, v, *args,
                         selection_config=pipeline.SelectionConfig(conv3x3="fused"))
    data = methods.MethodData(train_images, test_images, digits_split, (8, 8, 1))
    monkeypatch.setattr(methods.registry, "run", no_work)
    with pytest.raises(ValueError, match="theta_o"):
        methods.produce("ga", small_model, other, data, methods.default_config("ga"),
                        jax.random.PRNGKey(0))

    full = masks.random_mask(theta_o["params"], 1.0, jax.random.PRNGKey(0))
    name = sorted(full)[0]  # a top-level module: all its tensors lose their booleans
    partial = {k: v for k, v in full.items() if k != name}
    per_element = jax.tree.map(lambda p: np.ones(p.shape, bool), theta_o["params"])
    for mask, words in ((partial, f"tensors without one: ['{name}"),
                        (per_element, "one boolean for the whole tensor")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            mcu.train_curve(small_model, theta_o, theta_p, train_images,
                            digits_split.retain_subset, digits_split.forget, refs,
                            MCUConfig(epochs=1, progress=False), jax.random.PRNGKey(0),
                            mask=mask)

    # A NaN or infinity in a point spoils the whole curve, its ends too (0 * NaN is NaN).
    name = sorted(pytrees.flatten(theta_p["params"]))[0]
    flat = pytrees.flatten(theta_p["params"])
    nan_params = pytrees.unflatten(theta_p["params"], {**flat, name: flat[name].at[0].set(
        jnp.nan)})
    nan_p = {**theta_p, "params": nan_params}
    with pytest.raises(ValueError, match=f"theta_p: leaf params/{name} has a NaN"):
        pipeline.run_mcu(small_model, theta_o, nan_p, *args)
    # (train_curve names the leaf with or without its "params/" collection)
    with pytest.raises(ValueError, match=f"theta_p: leaf (params/)?{name} has a NaN"):
        mcu.train_curve(small_model, theta_o, nan_p, train_images, digits_split.retain_subset,
                        digits_split.forget, refs, MCUConfig(epochs=0, progress=False),
                        jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=f"points\\[2\\]: leaf {name} has a NaN"):
        sweep.sweep(small_model, [theta_o["params"], theta_o["params"], nan_params], [0.0],
                    theta_o["batch_stats"], (train_images, digits_split.retain[:64]),
                    {"forget": (train_images, digits_split.forget)})
    # An empty or overlapping retain subset is refused before the mask phase too.
    for retain_subset, words in ((np.zeros(0, np.int64), "retain subset is empty"),
                                 (digits_split.forget[:3], "share 3 indices")):
        bad = dataclasses.replace(digits_split, retain_subset=retain_subset)
        with pytest.raises(ValueError, match=words):
            pipeline.run_mcu(small_model, theta_o, theta_p, train_images, test_images, bad,
                             refs, jax.random.PRNGKey(0))

    x = np.zeros((3, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="labels must be integers"):
        Images.from_arrays(x, np.array([0.0, 1.7, 2.2]), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="'forget'.* is empty"):
        sweep.sweep(small_model, [theta_o["params"]] * 3, [0.0, 1.0], theta_o["batch_stats"],
                    (train_images, digits_split.retain[:64]),
                    {"forget": (train_images, np.zeros(0, np.int64))})


def test_bad_sets_keys_budgets_and_cached_files_are_refused_before_any_work(
        monkeypatch, tmp_path, theta_o, theta_p, digits, digits_images, digits_split,
        small_model):
    """An index of any set the run reads (here out of range), an int where the key belongs,
    a mask budget of no tensor and a damaged cached file of the run folder are named before
    the mask, the curve or the sweep start."""
    from mcu_jax.data import make_split

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    for name in ("compute_mask", "train_curve"):
        monkeypatch.setattr(pipeline, name, no_work)
    monkeypatch.setattr(pipeline.sweep, "sweep", no_work)
    train_images, test_images = digits_images
    n_train, n_test = train_images.num_examples, test_images.num_examples
    refs, key = {"train": 99.0, "val": 95.0}, jax.random.PRNGKey(0)
    class_split = make_split(digits, "class", forget_class=3, seed=0)
    far = np.array([0, 5000])
    for split, words in (
            (dataclasses.replace(digits_split, test=far), rf"split\.test has .* \[0, {n_test}\)"),
            (dataclasses.replace(digits_split, retain=np.append(digits_split.retain, 5000)),
             rf"split\.retain has indices outside \[0, {n_train}\)"),
            (dataclasses.replace(class_split, test_forget=far), r"split\.test_forget has"),
            (dataclasses.replace(class_split, test_retain=np.zeros(0, np.int64)),
             r"split\.test_retain is empty")):
        with pytest.raises(ValueError, match=words):
            pipeline.run_mcu(small_model, theta_o, theta_p, train_images, test_images, split,
                             refs, key)
    args = (small_model, theta_o, theta_p, train_images, test_images, digits_split, refs)
    with pytest.raises(ValueError, match=r"key must be a JAX random key .*got 0"):
        pipeline.run_mcu(*args, 0)
    with pytest.raises(ValueError, match=r"mask\.k=0\.0 and mask\.k_r=0\.1 selects no tensor"):
        pipeline.run_mcu(*args, key, mask_config=pipeline.MaskConfig(k=0.0))
    # A cached phase file that is not JSON names the file and what to do.
    for file, words in (("mask.json", "delete it to recompute the mask"),
                        ("seconds.json", "delete it to count this session's seconds only")):
        folder = tmp_path / file.split(".")[0]
        folder.mkdir()
        (folder / file).write_text('{"conv0/kernel": tru')
        with pytest.raises(ValueError, match=rf"{file} is not valid JSON \(.*; {words}"):
            pipeline.run_mcu(*args, key, out_dir=folder)
    ts = np.linspace(0, 1, 4)
    for text, words in (("{bad", r"sweep\.json is not valid JSON"),
                        ("[1, 2]", r"sweep\.json holds a JSON list, not an object"),
                        ('{"ts": 1}', r"sweep\.json is not a saved sweep")):
        (tmp_path / "sweep.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{words}.*delete it to recompute the sweep"):
            pipeline._cached_sweep(tmp_path, ts)


def test_curve_trains_on_the_retain_subset_and_the_forget_set(monkeypatch, theta_o, theta_p,
                                                                digits_images, digits_split,
                                                                small_model):
    """run_mcu hands curve training the split's retain share of D_r (the paper's 50%; the
    retain-share ablation varies it) and all of D_f."""

    class Stop(Exception):
        pass

    seen = {}

    def spy(model, theta_o, theta_p, images, retain_subset, forget, *args, **kwargs):
        seen.update(retain=np.asarray(retain_subset), forget=np.asarray(forget))
        raise Stop

    monkeypatch.setattr(pipeline, "compute_mask", lambda model, theta_o, *a: masks.random_mask(
        theta_o["params"], 1.0, jax.random.PRNGKey(0)))
    monkeypatch.setattr(pipeline, "train_curve", spy)
    train_images, test_images = digits_images
    with pytest.raises(Stop):
        pipeline.run_mcu(small_model, theta_o, theta_p, train_images, test_images, digits_split,
                         {"train": 99.0, "val": 95.0}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(seen["retain"], digits_split.retain_subset)
    np.testing.assert_array_equal(seen["forget"], digits_split.forget)
    assert seen["retain"].size == int(np.floor(0.5 * digits_split.retain.size + 0.5))  # half up


def test_run_mcu_on_a_polychain_sweeps_and_exports_the_chain(monkeypatch, tmp_path, theta_o,
                                                             theta_p, digits_images,
                                                             digits_split, small_model):
    """MCUConfig(curve="polychain") is used end to end: both sweeps (over t and at t*) walk
    the chain, the exported theta(t*) is the chain's point at t*, and the sweep's accuracies
    are those of the chain."""
    from mcu_jax import sweep

    curves_swept, original = [], sweep.sweep

    def spy(*args, **kwargs):
        curves_swept.append(kwargs.get("curve"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline.sweep, "sweep", spy)
    train_images, test_images = digits_images
    refs = train.reference_accuracies(small_model, theta_o, train_images, test_images,
                                      digits_split)
    config = MCUConfig(epochs=1, progress=False, curve="polychain")
    out = pipeline.run_mcu(small_model, theta_o, theta_p, train_images, test_images,
                           digits_split, refs, jax.random.PRNGKey(0), config,
                           pipeline.MaskConfig(k=0.5, k_r=0.1),
                           pipeline.SelectionConfig(num_t=5), out_dir=tmp_path / "chain")
    assert curves_swept == ["polychain", "polychain"]
    points = [theta_o["params"], out.theta_c, theta_p["params"]]
    want = curves.polychain(points, np.float32(out.t_star))
    for a, b in zip(jax.tree.leaves(out.variables["params"]), jax.tree.leaves(want),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = original(small_model, points, out.sweep.ts, theta_o["batch_stats"],
                        (train_images, digits_split.retain),
                        {"forget": (train_images, digits_split.forget)}, curve="polychain")
    np.testing.assert_allclose(again.acc["forget"], out.sweep.acc["forget"], atol=1e-4)
