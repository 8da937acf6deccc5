"""The experiment runner on a tiny digits config: outputs, schema, resume, refusal."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mcu_jax import checkpoint, experiment, masks, train
from mcu_jax.mcu import MCUConfig
from mcu_jax.methods import default_config
from mcu_jax.pipeline import SelectionConfig
from mcu_jax.problem import ProblemConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import run as run_script  # noqa: E402


def _tiny(tmp_path, scenario="random", **kw):
    quick = train.TrainConfig(epochs=2, lr=0.05, progress=False)
    methods = dataclasses.replace(
        experiment.MethodsConfig(), neggrad=default_config("neggrad", scenario, epochs=1)
    )
    return experiment.ExperimentConfig(
        name=f"tiny_{scenario}",
        command="pytest",
        problem=ProblemConfig(scenario=scenario, val_ratio=0.3),
        seeds=(0, 1),
        original=quick,
        retrain=quick,
        methods=("neggrad",),
        method_configs=methods,
        mcu_modes=("fixed", "adaptive"),
        mcu=MCUConfig(epochs=1),
        selection=SelectionConfig(num_t=5),
        out_dir=str(tmp_path),
        progress=False,
        **kw,
    )


ROW_KEYS = {"method", "UA", "RA", "TA", "MIA", "avg_gap", "rte_min"}


def test_runner_writes_results_table_and_figures(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path)
    out = experiment.run_experiment(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["name"] == "tiny_random"
    names = [row["method"] for row in results["rows"]]
    assert names == ["RT", "NegGrad+", "MCU-NegGrad+", "MCU_beta-NegGrad+"]
    for row in results["rows"]:
        assert ROW_KEYS <= set(row)
        for key in ROW_KEYS - {"method"}:
            assert set(row[key]) == {"mean", "std", "values"} and len(row[key]["values"]) == 2
        if row["method"].startswith("MCU"):
            assert 0.75 <= row["t_star"]["mean"] <= 1.0
            assert len(row["region"]) == 2
    assert results["rows"][0]["avg_gap"]["mean"] == 0.0
    md = (out / "results.md").read_text()
    assert "| MCU_beta-NegGrad+ |" in md and "Avg. Gap" in md and "±" in md
    pngs = sorted((out / "curves").glob("*.png"))
    assert len(pngs) == 4 and all(p.stat().st_size > 1000 for p in pngs)
    # An MCU row's metrics come from run_mcu's own pass at t*; they are what evaluating the
    # exported theta(t*) gives.
    from mcu_jax import checkpoint, problem

    prob = problem.build(dataclasses.replace(cfg.problem, seed=0))
    (model_dir,) = (out / "seed_0").glob("mcu_adaptive_*/model")
    variables, _ = checkpoint.load_model(model_dir)
    again_eval = experiment.evaluate_model(prob, variables, cfg.mia, 0)
    row = next(r for r in results["rows"] if r["method"] == "MCU_beta-NegGrad+")
    for key in ("UA", "RA", "TA", "MIA"):
        assert row[key]["values"][0] == pytest.approx(again_eval[key], abs=1e-6), key

    # Running again reuses every finished phase: no training happens at all.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished phase was recomputed")

    monkeypatch.setattr(train, "fit", no_training)
    again = experiment.run_experiment(cfg)
    assert json.loads((again / "results.json").read_text())["rows"] == results["rows"]

    # A different config in the same folder is refused instead of mixing results.
    with pytest.raises(ValueError, match="mcu"):
        experiment.run_experiment(dataclasses.replace(cfg, mcu=MCUConfig(epochs=2)))


def test_class_wise_rows_have_ua_test(tmp_path, monkeypatch):
    from mcu_jax import plots

    cfg = dataclasses.replace(_tiny(tmp_path, "class"), seeds=(0,), mcu_modes=("adaptive",),
                              mia=False)
    labels = []
    draw = plots.curve_figure

    def spy(ts, acc, rt_acc, region, t_star, star_gap=None, *args, **kwargs):
        labels.append((star_gap, rt_acc))
        return draw(ts, acc, rt_acc, region, t_star, star_gap, *args, **kwargs)

    monkeypatch.setattr(plots, "curve_figure", spy)
    out = experiment.run_experiment(cfg)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all("UA_test" in row for row in rows)
    assert "UA_test" in (out / "results.md").read_text()
    # The star is labelled with the measured theta(t*)'s gap to RT over D_r, D_f, D_t, D_tf.
    (star_gap, rt_acc), = labels
    (seed_dir,) = [p for p in out.iterdir() if p.name == "seed_0"]
    from mcu_jax import checkpoint

    (model_dir,) = seed_dir.glob("mcu_adaptive_*/model")
    measured = checkpoint.load_model(model_dir)[1]["measured"]
    sets = ("retain", "forget", "test", "test_forget")
    assert star_gap == pytest.approx(np.mean([abs(measured[k] - rt_acc[k]) for k in sets]))


def test_class_wise_mia_non_members_are_the_retained_classes(monkeypatch):
    """Class-wise, the MIA's non-members are D_tr (SalUn's protocol; TA's set), not D_t."""
    from mcu_jax import metrics

    seen = {}

    def fake_mia(members, non_members, forget, seed):
        seen.update(members=members, non_members=non_members, forget=forget)
        return 12.5

    monkeypatch.setattr(metrics, "mia_efficacy", fake_mia)
    probs = {k: np.full(4, i / 10) for i, k in enumerate(
        ("retain", "forget", "test", "test_retain", "test_forget"))}
    acc = {k: 50.0 for k in probs}
    result = experiment.scored_metrics(acc, probs, mia=True, seed=0)
    assert result["MIA"] == 12.5
    np.testing.assert_array_equal(seen["non_members"], probs["test_retain"])
    np.testing.assert_array_equal(seen["members"], probs["retain"])
    np.testing.assert_array_equal(seen["forget"], probs["forget"])
    random_probs = {k: probs[k] for k in ("retain", "forget", "test")}
    experiment.scored_metrics({k: 50.0 for k in random_probs}, random_probs, True, 0)
    np.testing.assert_array_equal(seen["non_members"], probs["test"])


def test_experiment_configs_load_and_name_their_command():
    names = sorted(p.stem for p in run_script.CONFIGS.glob("*.py") if not p.stem.startswith("_"))
    assert {"digits_random", "digits_class", "cifar10_resnet20_random",
            "cifar10_preresnet110_class", "tinyimagenet_vgg16bn_random",
            "imagenet100_vit_class"} <= set(names)
    for name in names:
        cfg = run_script.load_config(name)
        cfg = getattr(cfg, "experiment", cfg)  # ablations wrap an experiment
        assert cfg.name == name and name in cfg.command


def test_models_from_reuses_the_same_request_and_leaves_another_alone(tmp_path, capsys):
    """models_from: a run reuses theta_o, RT and theta_p that another run made for the same
    request (training nothing), and makes its own when its request differs there, leaving
    the other run's models as they were."""
    once = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    base = dataclasses.replace(_tiny(tmp_path), name="base", seeds=(0,), original=once,
                               retrain=once, mcu_modes=(), mia=False)
    first = json.loads((experiment.run_experiment(base) / "results.json").read_text())
    shared = tmp_path / "base" / "seed_0"
    stamps = {m: (shared / m / "metadata.json").stat().st_mtime_ns
              for m in ("theta_o", "rt", "neggrad")}
    same = dataclasses.replace(base, name="same", models_from="base")
    again = json.loads((experiment.run_experiment(same) / "results.json").read_text())
    assert _numbers(again["rows"]) == _numbers(first["rows"])
    assert not any((tmp_path / "same" / "seed_0" / m).exists() for m in ("theta_o", "rt"))
    assert "not reusing" not in capsys.readouterr().out
    other = dataclasses.replace(same, name="other",
                                original=dataclasses.replace(once, lr=0.02))
    experiment.run_experiment(other)
    out = capsys.readouterr().out
    assert "theta_o (seed 0): not reusing" in out and "rt (seed 0)" not in out
    own = tmp_path / "other" / "seed_0"
    assert (own / "theta_o").is_dir() and not (own / "rt").exists()  # RT's request matched
    assert (own / "neggrad").is_dir()  # theta_p of another theta_o is another request
    assert stamps == {m: (shared / m / "metadata.json").stat().st_mtime_ns for m in stamps}


def test_model_folder_prefers_a_started_own_folder_then_the_shared_one(tmp_path, monkeypatch):
    """A run that began a model in its own seed folder finishes it there; otherwise the
    shared folder is tried, and its request mismatch sends the model home. A variant of the
    run's own (``out_name``, e.g. the forgetting ablation's epochs) is never shared."""
    from mcu_jax import runs

    cfg = experiment.ExperimentConfig(out_dir=str(tmp_path), models_from="base")
    own_seed = tmp_path / "abl" / "seed_0"
    shared = tmp_path / "base" / "seed_0"
    tried = []

    def make(folder):
        tried.append(folder)
        if folder.parent == shared and folder.name == "rt":
            raise runs.RequestMismatch("another request")
        return folder

    assert experiment.model_folder(cfg, own_seed, 0, "theta_o", make) == shared / "theta_o"
    assert experiment.model_folder(cfg, own_seed, 0, "rt", make) == own_seed / "rt"
    (own_seed / "neggrad").mkdir(parents=True)
    assert experiment.model_folder(cfg, own_seed, 0, "neggrad", make) == own_seed / "neggrad"
    assert tried == [shared / "theta_o", shared / "rt", own_seed / "rt", own_seed / "neggrad"]

    produced = []
    monkeypatch.setattr(experiment.methods, "produce",
                        lambda name, model, theta_o, data, mcfg, key, folder: produced.append(
                            folder))
    ctx = experiment.SeedContext(
        cfg, None, 0, type("P", (), {"train": None, "test": None, "split": None,
                                     "input_shape": None, "model": None})(),
        {}, {}, {}, own_seed, jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    experiment.base_model(ctx, "rl", out_name="rl_forgetting_2")
    experiment.base_model(ctx, "rl")
    assert produced == [own_seed / "rl_forgetting_2", shared / "rl"]


def test_mask_note_says_less_or_more_and_what_each_mask_trains():
    from mcu_jax import ablation

    note = ablation.mask_note(
        {"no mask": 1.0, "parameter 10% mask": 0.123, "random 10% mask": 0.3},
        {"no mask": 2.0, "parameter 10% mask": 0.5, "random 10% mask": 2.2})
    assert "no mask, trains 100.0%: 2 s" in note
    assert "parameter 10% mask, trains 12.3%: 0.5 s (75.0% less)" in note
    assert "random 10% mask, trains 30.0%: 2.2 s (10.0% more)" in note
    assert "random 10% mask: not timed" in ablation.mask_note(
        {}, {"no mask": 2.0, "random 10% mask": None})


def test_run_script_errors_are_one_line(capsys):
    assert run_script.main(["no_such_experiment"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert run_script.main(["digits_random", "mcu.epoch=3"]) == 2
    assert "unknown config field 'mcu.epoch'" in capsys.readouterr().err
    assert run_script.main(["digits_random", "--fields"]) == 0
    assert "mcu.epochs" in capsys.readouterr().out


def test_bad_requests_are_refused_before_any_training(tmp_path, capsys):
    """An ablation's unknown base method and a repeated seed are refused when the config is
    made: nothing is trained and no folder is bound to the bad value."""
    out = tmp_path / "runs"
    assert run_script.main(["digits_ablation_k", "method=bogus",
                            f"experiment.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method=bogus" in err and "unknown method 'bogus'" in err
    assert run_script.main(["digits_ablation_k", "method=rt", f"experiment.out_dir={out}"]) == 2
    assert "'rt' is not a pre-unlearning method" in capsys.readouterr().err
    assert run_script.main(["digits_random", "seeds=0,0", f"out_dir={out}"]) == 2
    assert "each seed may appear once" in capsys.readouterr().err
    assert not out.exists()


def test_run_script_takes_a_config_file_with_its_own_method(tmp_path, capsys, monkeypatch):
    """A config file anywhere can register its own method and give it hyperparameters that
    the command line overrides (a MethodsConfig subclass with a field for it)."""
    from mcu_jax.methods import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # 'mine' is undone
    path = tmp_path / "my_experiment.py"
    path.write_text(
        "import dataclasses\n"
        "from mcu_jax import methods\n"
        "from mcu_jax.experiment import ExperimentConfig, MethodsConfig\n"
        "if 'mine' not in methods.available():\n"
        "    methods.register('mine', methods.get('ga'))\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Methods(MethodsConfig):\n"
        "    mine: methods.MethodConfig = methods.MethodConfig(epochs=3)\n"
        "def get_config():\n"
        "    return ExperimentConfig(name='my_experiment', methods=('mine',),\n"
        "                            method_configs=Methods())\n"
    )
    assert run_script.main([str(path), "method_configs.mine.epochs=4", "--fields"]) == 0
    assert "method_configs.mine.epochs" in capsys.readouterr().out.split()
    cfg = run_script.load_config(str(path))
    assert experiment.method_config(cfg, "mine").epochs == 3
    assert experiment.rerun_command(cfg) == "python experiments/run.py my_experiment"


@pytest.mark.parametrize("scenario, dataset, alpha", [("random", "cifar10", 0.9),
                                                       ("class", "cifar10", 0.2),
                                                       ("class", "tinyimagenet", 0.1),
                                                       ("class", "digits", 0.2)])
def test_negtv_alpha_follows_the_scenario(scenario, dataset, alpha):
    """The default NegTV alpha is the paper's for the experiment's scenario and data set
    (a class-wise experiment built from defaults or a scenario override got 0.9)."""
    cfg = experiment.ExperimentConfig(problem=ProblemConfig(dataset=dataset, scenario=scenario),
                                      methods=("negtv",))
    assert experiment.method_config(cfg, "negtv").alpha == alpha
    given = dataclasses.replace(cfg, method_configs=dataclasses.replace(
        cfg.method_configs, negtv=default_config("negtv", alpha=0.5)))
    assert experiment.method_config(given, "negtv").alpha == 0.5  # an explicit value stays


def test_method_keys_come_from_names_not_positions():
    import jax
    import numpy as np

    key = jax.random.PRNGKey(3)
    a, b = experiment.name_key(key, "neggrad"), experiment.name_key(key, "neggrad")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, experiment.name_key(key, "ga"))
    assert not np.array_equal(a, experiment.name_key(jax.random.PRNGKey(4), "neggrad"))


def test_unknown_method_or_mode_is_rejected():
    with pytest.raises(ValueError, match="known"):
        experiment.ExperimentConfig(methods=("magic",))
    with pytest.raises(ValueError, match="mcu_modes"):
        experiment.ExperimentConfig(mcu_modes=("sometimes",))
    # RT is every table's reference row (from `retrain`); as a method it would replace it.
    with pytest.raises(ValueError, match="retrain"):
        experiment.ExperimentConfig(methods=("neggrad", "rt"))


@pytest.mark.parametrize("kind, values", [("k_r", (0.0, 0.2)), ("forgetting", (1, 2)),
                                          ("retain_share", (0.3, 1.0))])
def test_ablation_sweeps_write_rows_and_figure(tmp_path, monkeypatch, kind, values):
    from mcu_jax import ablation

    exp = dataclasses.replace(_tiny(tmp_path), name=f"abl_{kind}", seeds=(0,), mia=False,
                              mcu_modes=())
    cfg = ablation.AblationConfig(experiment=exp, kind=kind, values=values,
                                  method="neggrad", default=values[0])
    keys = []
    mcu_row = ablation.mcu_row

    def recording(ctx, base, mcu_cfg, mask_cfg, sel_cfg, key, *args, **kwargs):
        keys.append(np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(
            key.dtype, jax.dtypes.prng_key) else key))
        return mcu_row(ctx, base, mcu_cfg, mask_cfg, sel_cfg, key, *args, **kwargs)

    monkeypatch.setattr(ablation, "mcu_row", recording)
    plotted = {}
    draw = ablation.plots.retain_share_figure

    def spy(values, series, **kwargs):
        plotted.update(series)
        return draw(values, series, **kwargs)

    monkeypatch.setattr(ablation.plots, "retain_share_figure", spy)
    out = ablation.run_ablation(cfg)
    # Every value trains its curve with the same key: only the varied setting differs.
    assert len(keys) == 2 and np.array_equal(keys[0], keys[1])
    rows = json.loads((out / "results.json").read_text())["rows"]
    mcu_rows = [r for r in rows if r["method"].startswith("MCU")]
    assert len(mcu_rows) == 2
    assert all("t_star" in r and "avg_gap" in r for r in mcu_rows)
    if kind == "forgetting":
        assert [r["method"] for r in rows].count("NegGrad+ (1 epochs)") == 1
    if kind == "retain_share":  # the figure shows the table's Avg. Gap (gap of the means)
        from mcu_jax import metrics

        assert plotted["avg_gap"] == [metrics.table_avg_gap(rows, r, False) for r in mcu_rows]
    assert (out / f"ablation_{kind}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="outside"):
        ablation.AblationConfig(experiment=exp, kind="k", values=(1.5,))


def test_mask_ablation_runs_no_mask_parameter_and_random_curves(tmp_path, monkeypatch):
    """Figure 2: one unmasked curve (shared by every budget), and per budget the parameter
    mask (k = k_r = budget) and a random mask of that budget from the seed; all fixed-beta MCU
    from the same key; the figure and results.md carry the timed epochs."""
    from mcu_jax import ablation

    once = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    exp = dataclasses.replace(_tiny(tmp_path), name="abl_mask", seeds=(0,), mia=False,
                              mcu_modes=(), mcu=MCUConfig(epochs=2), original=once,
                              retrain=once, selection=SelectionConfig(num_t=4))
    cfg = ablation.AblationConfig(experiment=exp, kind="mask", values=(0.1, 0.3))
    assert ablation.default_value(cfg) == 0.1
    calls, trained = [], []
    mcu_row, run_mcu = ablation.mcu_row, experiment.pipeline.run_mcu

    def recording(ctx, base, mcu_cfg, mask_cfg, sel_cfg, key, *args, **kwargs):
        calls.append((mcu_cfg.beta_mode, mask_cfg, np.asarray(jax.random.key_data(key))))
        return mcu_row(ctx, base, mcu_cfg, mask_cfg, sel_cfg, key, *args, **kwargs)

    def counting(*args, **kwargs):
        trained.append(args[9])  # its mask_config
        return run_mcu(*args, **kwargs)

    monkeypatch.setattr(ablation, "mcu_row", recording)
    monkeypatch.setattr(experiment.pipeline, "run_mcu", counting)
    figures = {}
    monkeypatch.setattr(ablation.plots, "mask_figure",
                        lambda seconds, panels, **kw: figures.update(s=seconds, p=panels))
    out = ablation.run_ablation(cfg)
    masks_seen = [(m.enabled, m.kind, m.k, m.k_r, m.seed) for _, m, _ in calls]
    assert masks_seen == [(False, "parameter", 0.5, 0.1, 0), (True, "parameter", 0.1, 0.1, 0),
                          (True, "random", 0.1, 0.1, 0), (False, "parameter", 0.5, 0.1, 0),
                          (True, "parameter", 0.3, 0.3, 0), (True, "random", 0.3, 0.1, 0)]
    assert [m.enabled for m in trained] == [False, True, True, True, True]  # unmasked once
    assert {mode for mode, _, _ in calls} == {"fixed"}
    assert all(np.array_equal(k, calls[0][2]) for _, _, k in calls)
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    labels = ["no mask", "parameter 10% mask", "random 10% mask", "parameter 30% mask",
              "random 30% mask"]
    assert [m for m in rows if m.startswith("MCU")] == [f"MCU-NegGrad+ ({x})" for x in labels]
    assert list(figures["s"]) == labels
    for label in labels:
        assert figures["s"][label] == rows[f"MCU-NegGrad+ ({label})"]["rte_curve_epoch_s"]["mean"]
    assert [p["label"] for p in figures["p"]] == ["10% mask", "30% mask"]
    param, rand = (rows[f"MCU-NegGrad+ ({x} 30% mask)"] for x in ("parameter", "random"))
    seed_dir = out / "seed_0"
    for panel_set, name in (("solid", "parameter"), ("dashed", "random")):
        sweep_json = json.loads((seed_dir / f"ablation_mask_{name}_0.3" / "sweep.json").read_text())
        assert figures["p"][1][panel_set] == sweep_json["acc"]
    assert param["t_star"] is not None and rand["t_star"] is not None
    assert "Curve training, seconds per epoch" in (out / "results.md").read_text()
    assert "random 30% mask, trains " in (out / "results.md").read_text()
    assert rows["MCU-NegGrad+ (no mask)"]["mask_trained"]["mean"] == 1.0
    params = checkpoint.load_model(seed_dir / "theta_o")[0]["params"]
    for label, folder in (("parameter 30% mask", "ablation_mask_parameter_0.3"),
                          ("random 30% mask", "ablation_mask_random_0.3")):
        saved = masks.load(seed_dir / folder / "mask.json", params)
        assert rows[f"MCU-NegGrad+ ({label})"]["mask_trained"]["mean"] == pytest.approx(
            masks.trained_fraction(saved, params))
    assert saved == masks.random_mask(params, 0.3, jax.random.PRNGKey(0))


@pytest.mark.parametrize("kind, values, match", [
    ("mask", (0.0,), r"outside \(0, 1\]"),
    ("retain_share", (0.0,), r"outside \(0, 1\]"),
    ("beta", (-0.1,), "beta must be a number >= 0, got -0.1"),
    ("forgetting", (2.5,), "whole epochs"), ("k_r", (1.2,), "outside"),
    ("k_r", (1.0,), r"outside \[0, 1\)"), ("k", (0.0,), r"outside \(0, 1\]")])
def test_ablation_values_are_checked_up_front(kind, values, match):
    from mcu_jax import ablation

    with pytest.raises(ValueError, match=match):
        ablation.AblationConfig(kind=kind, values=values)


def test_ablation_default_is_the_papers_for_the_kind():
    from mcu_jax import ablation

    defaults = {kind: ablation.default_value(ablation.AblationConfig(
        kind=kind, values=(1,) if kind == "forgetting" else (0.5,)))
        for kind in ("mask", "beta", "k", "k_r", "retain_share", "forgetting")}
    assert defaults == {"mask": 0.1, "beta": 0.2, "k": 0.5, "k_r": 0.1, "retain_share": 0.5,
                        "forgetting": None}
    given = ablation.AblationConfig(kind="k", values=(0.3,), default=0.3)
    assert ablation.default_value(given) == 0.3
    # Another kind given later gets its own default, and a run records it written out.
    changed = run_script.apply_overrides(ablation.AblationConfig(kind="beta"), ["kind=k"])
    assert ablation.default_value(changed) == 0.5


def _numbers(rows):
    """results.json rows without the wall-clock columns (which differ run to run)."""
    return [{k: v for k, v in row.items() if not k.startswith("rte")} for row in rows]


def test_runner_killed_with_sigkill_ends_with_the_same_results(tmp_path):
    import os
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "experiments/run.py", "digits_random", "seeds=0",
            "original.epochs=3", "retrain.epochs=3", "method_configs.neggrad.epochs=1",
            "mcu.epochs=3", "selection.num_t=5", "progress=false"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda out: subprocess.run(args + [f"out_dir={out}"], cwd=root, env=env,  # noqa: E731
                                     capture_output=True, text=True, timeout=600)
    done = run(tmp_path / "a")
    assert done.returncode == 0, done.stderr[-2000:]
    seed_dir = tmp_path / "b" / "digits_random" / "seed_0"
    proc = subprocess.Popen(args + [f"out_dir={tmp_path / 'b'}"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    curve = seed_dir / "mcu_adaptive_MCU_beta-NegGradplus" / "curve"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if curve.is_dir() and any(p.name.isdigit() for p in curve.iterdir()):
            break  # killed during curve training, after its first epoch checkpoint
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    again = run(tmp_path / "b")
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((tmp_path / "a" / "digits_random" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "digits_random" / "results.json").read_text())
    assert _numbers(a["rows"]) == _numbers(b["rows"])


# --- Cross-checks against independent computations -------------------------------------------


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    """The cheapest complete run with two seeds (one base method, fixed-beta MCU, no MIA):
    ``(config, run folder, results.json)``."""
    once = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    cfg = dataclasses.replace(
        _tiny(tmp_path_factory.mktemp("two_seeds")), name="tiny_two_seeds", original=once,
        retrain=once, mcu_modes=("fixed",), mia=False, selection=SelectionConfig(num_t=4),
    )
    out = experiment.run_experiment(cfg)
    return cfg, out, json.loads((out / "results.json").read_text())


def _row(results, name):
    return next(r for r in results["rows"] if r["method"] == name)


def test_mcu_rte_adds_the_base_methods_minutes(two_seed_run):
    """An MCU row's RTE is theta_p's minutes (the base method's own record) plus the mask,
    curve and selection minutes run_mcu recorded (mcu.json), seed by seed."""
    cfg, out, results = two_seed_run
    mcu, base = _row(results, "MCU-NegGrad+"), _row(results, "NegGrad+")
    for i, seed in enumerate(cfg.seeds):
        seed_dir = out / f"seed_{seed}"
        base_min = json.loads((seed_dir / "neggrad" / "metadata.json").read_text())["minutes"]
        phases = json.loads((seed_dir / "mcu_fixed_MCU-NegGradplus" / "mcu.json").read_text())
        phases = phases["minutes"]
        assert set(phases) == {"mask", "curve", "selection"}
        assert base_min > 0 and base["rte_min"]["values"][i] == pytest.approx(base_min)
        expected = base_min + sum(phases.values())
        assert mcu["rte_min"]["values"][i] == pytest.approx(expected, rel=1e-9)
        assert mcu["rte_phases"]["pre_unlearning"]["values"][i] == pytest.approx(base_min)
        for phase, minutes in phases.items():
            assert mcu["rte_phases"][phase]["values"][i] == pytest.approx(minutes)


def test_each_seeds_base_row_evaluates_that_seeds_theta_p(two_seed_run):
    """Every seed's base-method row is the evaluation of that seed's own saved theta_p on
    that seed's split (not a finished phase of another seed reused)."""
    from mcu_jax import checkpoint, problem

    cfg, out, results = two_seed_run
    row = _row(results, "NegGrad+")
    fresh = []
    for i, seed in enumerate(cfg.seeds):
        prob = problem.build(dataclasses.replace(cfg.problem, seed=seed))
        variables, _ = checkpoint.load_model(out / f"seed_{seed}" / "neggrad")
        fresh.append(experiment.evaluate_model(prob, variables, False, seed))
        for key in ("UA", "RA", "TA"):
            assert row[key]["values"][i] == pytest.approx(fresh[-1][key], abs=1e-6), (seed, key)
    # The seeds' models differ, so a row copied from the other seed could not pass.
    assert any(fresh[0][k] != fresh[1][k] for k in ("UA", "RA", "TA"))


def test_class_wise_scored_metrics_use_the_retained_test_classes():
    """Class-wise, TA is Acc(D_tr) and UA_test is 100 - Acc(D_tf); UA and RA come from D_f
    and D_r; the raw accuracies (Acc(D_t) among them) are kept unchanged."""
    acc = {"retain": 91.0, "forget": 12.0, "test": 70.0, "test_retain": 83.0,
           "test_forget": 7.0}
    result = experiment.scored_metrics(dict(acc), {}, mia=False, seed=0)
    assert result["TA"] == 83.0 and result["UA_test"] == 93.0
    assert result["UA"] == 88.0 and result["RA"] == 91.0
    assert result["acc"] == acc and "MIA" not in result
    random_wise = {k: acc[k] for k in ("retain", "forget", "test")}
    assert experiment.scored_metrics(random_wise, {}, mia=False, seed=0)["TA"] == 70.0


def test_prepare_seed_trains_theta_o_on_d_train_and_rt_on_all_of_d_r(tmp_path, monkeypatch):
    """theta_o trains on every training sample and RT on all of D_r (not the curve's
    retain subset); checked on seed 1 against the split drawn independently."""
    from mcu_jax import problem
    from mcu_jax.runs import RunDir

    class Stop(Exception):
        pass

    pools = {}

    def spy(model, images, pool, config, key, input_shape, out_dir, *args, **kwargs):
        pools[Path(out_dir).name] = np.asarray(pool)
        if Path(out_dir).name == "rt":
            raise Stop  # both pools seen: no training needed
        return None, {"refs": None}

    monkeypatch.setattr(experiment.train_lib, "train_model", spy)
    cfg = dataclasses.replace(_tiny(tmp_path), seeds=(1,))
    with pytest.raises(Stop):
        experiment.prepare_seed(cfg, RunDir(tmp_path / "run"), 1)
    prob = problem.build(dataclasses.replace(cfg.problem, seed=1))
    assert set(pools) == {"theta_o", "rt"}
    np.testing.assert_array_equal(pools["theta_o"], np.arange(prob.dataset.num_train))
    np.testing.assert_array_equal(pools["rt"], prob.split.retain)
    assert len(prob.split.retain_subset) < len(prob.split.retain)  # the two pools differ


def _point_ctx(cfg, seed):
    """A SeedContext for ablation._point with nothing trained (its models stubbed out)."""
    from mcu_jax import problem

    return experiment.SeedContext(
        cfg=cfg, run=None, seed=seed,
        prob=problem.build(dataclasses.replace(cfg.problem, seed=seed)), theta_o=None,
        refs=None, rt=None, seed_dir=None, method_key=jax.random.PRNGKey(seed),
        curve_key=jax.random.PRNGKey(seed + 100),
    )


def _stub_point(monkeypatch, ablation, mcu_result=None):
    """Stubs the base model and MCU of ``ablation._point``; returns the mcu_row calls."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(ablation, "base_model", lambda ctx, method, *a, **k: SimpleNamespace(
        variables=None, minutes=0.1))

    def fake_mcu_row(ctx, base, mcu_cfg, mask_cfg, sel_cfg, key, *args, **kwargs):
        calls.append({"ctx": ctx, "base": base, "mcu": mcu_cfg, "mask": mask_cfg})
        return dict(mcu_result or {"t_star": 1.0})

    monkeypatch.setattr(ablation, "mcu_row", fake_mcu_row)
    return calls


def test_beta_ablation_runs_fixed_beta_mcu_with_each_value(tmp_path, monkeypatch):
    from mcu_jax import ablation

    calls = _stub_point(monkeypatch, ablation)
    exp = dataclasses.replace(_tiny(tmp_path), mcu=MCUConfig(epochs=1, beta_mode="adaptive"))
    cfg = ablation.AblationConfig(experiment=exp, kind="beta", values=(0.05, 0.7))
    ctx = _point_ctx(exp, 0)
    for value in cfg.values:
        rows = ablation._point(cfg, ctx, value)
        assert list(rows) == [f"MCU-NegGrad+ (beta={value:g})"]
    assert [(c["mcu"].beta_mode, c["mcu"].beta) for c in calls] == [("fixed", 0.05),
                                                                     ("fixed", 0.7)]
    assert all(c["mcu"].epochs == 1 and c["mask"] == exp.mask for c in calls)


def test_retain_share_ablation_keeps_the_seeds_split(tmp_path, monkeypatch):
    """With seed 1, each retain share's split has the seed's own D_f and D_r (and D_t); only
    the curve's retain subset changes, to round(share * |D_r|) samples of D_r."""
    from mcu_jax import ablation

    calls = _stub_point(monkeypatch, ablation)
    exp = _tiny(tmp_path)
    cfg = ablation.AblationConfig(experiment=exp, kind="retain_share", values=(0.3, 1.0))
    ctx = _point_ctx(exp, 1)
    own = ctx.prob.split
    for value in cfg.values:
        ablation._point(cfg, ctx, value)
    assert len(calls) == 2
    for call, value in zip(calls, cfg.values, strict=True):
        split = call["ctx"].prob.split
        for part in ("forget", "retain", "test", "val"):
            np.testing.assert_array_equal(getattr(split, part), getattr(own, part), part)
        assert len(split.retain_subset) == round(value * len(own.retain))
        assert set(split.retain_subset.tolist()) <= set(own.retain.tolist())
        assert call["mcu"].beta_mode == "adaptive"
    assert ctx.prob.split is own  # the seed's own context is left as it was


def test_ablation_figure_highlights_exactly_the_default_value(tmp_path, monkeypatch):
    """The panel of the value equal to cfg.default is framed, and no other (the models are
    stubbed out: only the sweep's bookkeeping runs)."""
    from mcu_jax import ablation

    exp = dataclasses.replace(_tiny(tmp_path), name="abl_highlight", seeds=(0,), mia=False)
    acc = {"retain": 90.0, "forget": 80.0, "test": 85.0}

    def row(**extra):
        return {**experiment.scored_metrics(dict(acc), {}, False, 0), "rte_min": 0.1, **extra}

    ctx = dataclasses.replace(_point_ctx(exp, 0), rt=row())
    monkeypatch.setattr(ablation, "prepare_seed", lambda exp, run, seed: ctx)
    monkeypatch.setattr(ablation, "_evaluated", lambda *args, **kwargs: row())
    calls = _stub_point(monkeypatch, ablation, row(
        t_star=0.9, region=[[0.8, 1.0]], sweep={"ts": [0.0, 1.0], "acc": {"retain": [1.0, 2.0]}}))
    drawn = {}
    monkeypatch.setattr(ablation.plots, "ablation_figure",
                        lambda panels, **kwargs: drawn.update(panels=panels))
    for default, values in ((None, (0.1, 0.2, 0.3)), (0.3, (0.1, 0.2, 0.3)),
                            (0.5, (0.4, 0.6))):
        cfg = ablation.AblationConfig(experiment=dataclasses.replace(
            exp, name=f"abl_highlight_{default}"), kind="beta", values=values,
            default=default)
        ablation.run_ablation(cfg)
        panels = drawn.pop("panels")
        assert [p["label"] for p in panels] == [f"beta={v:g}" for v in values]
        framed = ablation.default_value(cfg)
        assert [p["highlight"] for p in panels] == [v == framed for v in values]
    assert len(calls) == 8  # every value of every sweep ran (stubbed) MCU


def _scored(name, ua, ra=99.0, ta=90.0, mia=10.0):
    return {"method": name, **{k: {"mean": v, "std": 0.0, "values": [v]}
                               for k, v in (("UA", ua), ("RA", ra), ("TA", ta), ("MIA", mia))}}


def test_beta_search_keeps_the_value_closest_to_rt_in_its_rows_place():
    """The MCU row of a beta search is the value with the smallest Avg. Gap to RT (ties: the
    first value), in the place of its values' rows, recording beta; every value is kept."""
    cfg = experiment.ExperimentConfig(methods=("neggrad", "ga"), mcu_modes=("fixed", "adaptive"),
                                      fixed_betas=(0.1, 0.3, 0.5))
    rows = [_scored("RT", 10.0), _scored("NegGrad+", 4.0),
            _scored("MCU-NegGrad+ beta=0.1", 6.0), _scored("MCU-NegGrad+ beta=0.3", 9.0),
            _scored("MCU-NegGrad+ beta=0.5", 13.0, ra=97.0),  # gaps 1.0, 0.25, 1.25
            _scored("MCU_beta-NegGrad+", 9.5), _scored("GA", 1.0),
            _scored("MCU-GA beta=0.1", 12.0), _scored("MCU-GA beta=0.3", 8.0),  # 0.5, 0.5
            _scored("MCU-GA beta=0.5", 1.0)]
    kept, searched = experiment.choose_fixed_betas(cfg, rows)
    assert [r["method"] for r in kept] == ["RT", "NegGrad+", "MCU-NegGrad+", "MCU_beta-NegGrad+",
                                           "GA", "MCU-GA"]
    assert kept[2]["beta"] == 0.3 and kept[2]["UA"]["mean"] == 9.0
    assert kept[5]["beta"] == 0.1 and kept[5]["UA"]["mean"] == 12.0  # a tie: the first
    assert [r["method"] for r in searched] == [r["method"] for r in rows
                                               if " beta=" in r["method"]]
    # Without a search (or without MCU rows) the rows are returned as they are.
    plain = experiment.ExperimentConfig(mcu_modes=("fixed",))
    assert experiment.choose_fixed_betas(plain, rows[:3]) == (rows[:3], [])


@pytest.mark.parametrize("field, value, match", [
    ("fixed_betas", (0.1, -0.2), "-0.2"), ("fixed_betas", (0.1, float("nan")), "nan"),
    ("fixed_betas", (0.2, 0.2), "once"), ("fixed_betas", (0.1, 0.1000001), "6 significant"),
    ("methods", ("neggrad", "ga", "neggrad"), "each method may appear once"),
    ("mcu_modes", ("fixed", "fixed"), "each mode may appear once"),
])
def test_repeated_or_bad_values_are_refused(field, value, match):
    with pytest.raises(ValueError, match=f"{field}.*{match}"):
        experiment.ExperimentConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("devices", -2, "devices (None: one device) must be an int >= 1, got -2"),
    ("devices", 0, "devices (None: one device) must be an int >= 1, got 0"),
    ("devices", 1.5, "devices (None: one device) must be an int >= 1, got 1.5"),
    ("out_dir", "", "out_dir must name a folder (a non-empty string), got ''"),
    ("name", "../../x", "name must be a single folder name (no '/', '.' or '..'), got '../../x'"),
    ("name", "a/b", "got 'a/b'"), ("name", "..", "got '..'"), ("name", "", "got ''"),
    ("models_from", "../digits_random", "models_from must be a single folder name"),
    ("seeds", (1.5,), "seeds: each seed must be an int >= 0, got 1.5"),
    ("seeds", (0, -1), "seeds: each seed must be an int >= 0, got -1"),
    ("seeds", 3, "seeds must be a tuple of ints, got 3"),
    ("mia", "no", "mia must be True or False, got 'no'"),
    ("table1", "yes", "table1 must be True or False, got 'yes'"),
    ("progress", 1, "progress must be True or False, got 1"),
    ("command", None, "command must be a string, got None"),
])
def test_bad_fields_are_refused_naming_field_and_value(field, value, message):
    """A device count below 1, an empty out_dir, a run name that is a path (it would leave
    out_dir), a seed that is no int >= 0 and a flag that is no bool are refused when the
    config is made, not once the run has started."""
    with pytest.raises(ValueError) as info:
        experiment.ExperimentConfig(**{field: value})
    assert message in str(info.value)


def test_good_fields_are_kept():
    """devices None (the default) and 1 both mean one device; seeds become plain ints."""
    assert experiment.ExperimentConfig().devices is None
    assert experiment.ExperimentConfig(devices=1).devices == 1
    cfg = experiment.ExperimentConfig(seeds=[np.int64(2), 0], models_from="digits_random",
                                      name="my-run_1.v2")
    assert cfg.seeds == (2, 0) and type(cfg.seeds[0]) is int


def test_bad_name_or_devices_on_the_command_line_binds_no_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    for item, message in [("name=../escaped", "name must be a single folder name"),
                          ("devices=0", "devices (None: one device) must be an int >= 1")]:
        assert run_script.main(["digits_random", item, f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and item in err and message in err, err
    assert not out.exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("argv", [
    ["digits_random", "--compile-cache", "off", "seeds=3", "mia=false"],
    ["digits_random", "seeds=3", "--compile-cache", "off", "mia=false"],
    ["digits_random", "seeds=3", "mia=false", "--compile-cache", "off"],
])
def test_run_script_takes_options_between_and_after_the_overrides(monkeypatch, argv):
    from mcu_jax import compile_cache

    seen = {}
    monkeypatch.setattr(compile_cache, "enable_from_args",
                        lambda value: seen.setdefault("cache", value))
    monkeypatch.setattr(run_script, "run", lambda cfg: seen.setdefault("cfg", cfg))
    assert run_script.main(argv) == 0
    assert seen["cache"] == "off"
    assert seen["cfg"].seeds == (3,) and seen["cfg"].mia is False


def test_beta_search_trains_one_curve_per_value_and_reports_the_best(tmp_path):
    """Each value of fixed_betas trains its own fixed-beta curve (its folder records that
    beta); the table's MCU row is the chosen value's, and results.md lists every value."""
    once = train.TrainConfig(epochs=1, lr=0.05, progress=False)
    cfg = dataclasses.replace(
        _tiny(tmp_path), name="tiny_beta_search", seeds=(0,), original=once, retrain=once,
        mcu_modes=("fixed",), fixed_betas=(0.0, 0.5), mia=False,
        selection=SelectionConfig(num_t=4),
    )
    out = experiment.run_experiment(cfg)
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["RT", "NegGrad+", "MCU-NegGrad+"]
    searched = {r["method"]: r for r in results["beta_search"]}
    assert set(searched) == {"MCU-NegGrad+ beta=0", "MCU-NegGrad+ beta=0.5"}
    chosen = _row(results, "MCU-NegGrad+")
    assert chosen["beta"] in (0.0, 0.5)
    same = searched[f"MCU-NegGrad+ beta={chosen['beta']:g}"]
    assert {k: v for k, v in chosen.items() if k not in ("method", "beta")} == \
        {k: v for k, v in same.items() if k != "method"}
    for beta in (0.0, 0.5):
        record = json.loads((out / "seed_0" / f"mcu_fixed_MCU-NegGradplus_beta{beta:g}"
                             / "run.json").read_text())
        assert record["config"]["mcu"]["beta_mode"] == "fixed"
        assert record["config"]["mcu"]["beta"] == beta
    md = (out / "results.md").read_text()
    assert "## MCU's beta search" in md and "| MCU-NegGrad+ beta=0.5 |" in md
    assert f"Chosen: MCU-NegGrad+: beta = {chosen['beta']:g}." in md
    # Every value's curve figure is kept aside; the chosen one is the MCU row's figure.
    searched_pngs = sorted(p.name for p in (out / "curves" / "beta_search").glob("*.png"))
    assert searched_pngs == ["MCU-NegGradplus_beta=0.5_seed0.png",
                             "MCU-NegGradplus_beta=0_seed0.png"]
    assert sorted(p.name for p in (out / "curves").glob("*.png")) == ["MCU-NegGradplus_seed0.png"]
    chosen_png = (out / "curves" / "beta_search"
                  / f"MCU-NegGradplus_beta={chosen['beta']:g}_seed0.png")
    assert (out / "curves" / "MCU-NegGradplus_seed0.png").read_bytes() == chosen_png.read_bytes()


def test_unset_groups_take_the_papers_values_for_the_problem():
    """A config that leaves the method configs and ``mcu`` unset gets the paper's numbers for
    its data set and scenario (ImageNet-100: GA 2 epochs at lr 0.001, curve 2 epochs;
    CIFAR-10 class-wise: curve 5 epochs), and the run records them written out."""
    from mcu_jax.mcu import paper_config

    for dataset, scenario, curve_epochs in [("imagenet100", "class", 2),
                                            ("cifar10", "class", 5), ("digits", "random", 10)]:
        cfg = experiment.ExperimentConfig(problem=ProblemConfig(dataset=dataset,
                                                                scenario=scenario))
        setting = "cifar10" if dataset == "digits" else dataset
        for name in experiment.TABLE1_METHODS:
            assert experiment.method_config(cfg, name) == default_config(name, scenario,
                                                                         setting)
        assert experiment.mcu_config(cfg) == paper_config(scenario, setting)
        assert experiment.mcu_config(cfg).epochs == curve_epochs
        full = experiment.paper_defaults(cfg)
        assert full.mcu == experiment.mcu_config(cfg)
        assert full.method_configs.ga == default_config("ga", scenario, setting)
        assert full.method_configs.negtv.alpha is None  # resolved per scenario, as before
        assert experiment.method_config(full, "negtv") == experiment.method_config(cfg, "negtv")
        assert experiment.paper_defaults(full) == full
    assert experiment.method_config(cfg, "ga").epochs == 5  # digits: CIFAR-10's protocol
    # Written out, the default config is the one run folders recorded before None existed.
    old = {m: default_config(m, **({"alpha": None} if m == "negtv" else {}))
           for m in experiment.TABLE1_METHODS}
    assert experiment.paper_defaults(experiment.ExperimentConfig()) == dataclasses.replace(
        experiment.ExperimentConfig(), mcu=MCUConfig(),
        method_configs=experiment.MethodsConfig(**old))
    with pytest.raises(ValueError, match="scenario must be one of"):
        paper_config("classwise")
    assert paper_config("random", "tiny_imagenet").epochs == 5  # the data set's name works
    with pytest.raises(ValueError, match="setting='bogus'"):
        paper_config("random", "bogus")


def test_command_line_fills_an_unset_group_before_setting_its_field(capsys):
    """``method_configs.ft.epochs=3`` on a config that leaves FT unset starts from the
    paper's FT for the problem, whose ``problem.`` overrides apply first wherever they are
    given; a group cannot be set as a value, and without a fill the field is refused."""
    from mcu_jax import config

    cfg = run_script.apply_overrides(run_script.load_config("digits_random"),
                                     ["method_configs.ft.epochs=3", "problem.dataset=imagenet100"])
    assert cfg.method_configs.ft == default_config("ft", "random", "imagenet100", epochs=3)
    assert cfg.method_configs.neggrad.lr == 0.05  # the config's own value is kept
    with pytest.raises(config.UnsetGroup, match="method_configs.ft is None"):
        config.override(experiment.ExperimentConfig(), ["method_configs.ft.epochs=3"])
    with pytest.raises(ValueError, match="is a group of fields"):
        run_script.apply_overrides(experiment.ExperimentConfig(), ["method_configs.ft=3"])
    assert run_script.main(["digits_class", "--fields"]) == 0
    assert {"mcu.epochs", "method_configs.salun.fraction"} <= set(capsys.readouterr().out.split())


def test_a_bad_problem_or_config_file_binds_no_folder(tmp_path, capsys):
    """A split, model or data set that cannot be made is refused in one line before the run
    folder is bound to it (a corrected command then runs there), and so is a config file
    without a usable get_config()."""
    out = tmp_path / "runs"
    for bad, match in [("problem.forget_ratio=1.5", "problem.forget_ratio=1.5: forget_ratio"),
                       ("problem.scenario=classwise", "scenario='classwise'"),
                       ("problem.model=resnet21", "unknown model 'resnet21'"),
                       ("problem.dataset=cifar1O", "unknown name='cifar1O'")]:
        assert run_script.main(["digits_random", bad, f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    assert run_script.main(["digits_class", "problem.forget_class=12", f"out_dir={out}"]) == 2
    assert "forget_class=12; expected an int in [0, 10)" in capsys.readouterr().err
    assert not out.exists()
    for text, match in [("x = 1\n", "has no get_config"),
                        ("def get_config():\n    return {}\n", "returned a dict")]:
        path = tmp_path / "mine.py"
        path.write_text(text)
        assert run_script.main([str(path)]) == 2
        assert match in capsys.readouterr().err


def test_a_bound_run_folder_is_compared_before_the_data_is_loaded(tmp_path, capsys,
                                                                  monkeypatch):
    """Reopening a folder bound to another request fails on the request (no data loaded,
    even when it could not be); only a new folder checks the problem first."""
    from mcu_jax import problem
    from mcu_jax.runs import RunDir

    out = tmp_path / "runs"
    RunDir(out / "digits_random").open({"another": "request"})
    assert RunDir(out / "digits_random").bound() and not RunDir(out / "x").bound()
    checked = []
    monkeypatch.setattr(problem, "check", lambda cfg: checked.append(cfg))
    assert run_script.main(["digits_random", f"out_dir={out}"]) == 2
    assert "was made with a different config" in capsys.readouterr().err and not checked
