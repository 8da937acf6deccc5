"""The command line: train -> unlearn -> mcu on digits, overrides and one-line errors."""

import json

import jax
import pytest

from mcu_jax import checkpoint, cli, config
from mcu_jax.mcu import MCUConfig


def _run(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_unlearn_mcu_chain(tmp_path, capsys):
    code, out, _ = _run(capsys, ["train", "--out", str(tmp_path / "o"), "train.epochs=2",
                                 "train.progress=false"])
    assert code == 0
    refs = json.loads(out)["refs"]
    assert set(refs) == {"train", "val", "test"}
    code, out, _ = _run(capsys, ["unlearn", "--theta-o", str(tmp_path / "o"), "--method", "ga",
                                 "--out", str(tmp_path / "p"), "epochs=1", "progress=false"])
    assert code == 0, out
    code, out, _ = _run(capsys, [
        "mcu", "--theta-o", str(tmp_path / "o"), "--theta-p", str(tmp_path / "p"),
        "--out", str(tmp_path / "m"), "mcu.epochs=1", "mcu.progress=false",
        "selection.num_t=5",
    ])
    assert code == 0, out
    result = json.loads(out)
    assert 0.75 <= result["t_star"] <= 1.0
    assert (tmp_path / "m" / "model" / "metadata.json").is_file()
    # `mask` saves the mask that `mcu` computed for the same theta_o and mask settings.
    code, out, _ = _run(capsys, ["mask", "--theta-o", str(tmp_path / "o"), "--out",
                                 str(tmp_path / "mask.json"), "mask.k=0.5"])
    assert code == 0, out
    result = json.loads(out)
    saved = json.loads((tmp_path / "mask.json").read_text())
    assert saved == json.loads((tmp_path / "m" / "mask.json").read_text())
    assert result["trained"] == [p for p, kept in saved.items() if kept]
    assert result["summary"].startswith("mask keeps ")
    # theta_p records the theta_o it was unlearned from: another theta_o is refused
    variables, meta = checkpoint.load_model(tmp_path / "o")
    checkpoint.save_model(tmp_path / "o2", jax.tree.map(lambda a: a + 1.0, variables), meta)
    code, _, err = _run(capsys, ["mcu", "--theta-o", str(tmp_path / "o2"), "--theta-p",
                                 str(tmp_path / "p"), "--out", str(tmp_path / "m2")])
    assert code == 2 and "was unlearned from another theta_o" in err, err


def test_user_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, ["train", "--out", str(tmp_path / "o"), "train.epoch=2"])
    assert code == 2
    assert err.count("\n") == 1 and "unknown config field 'train.epoch'" in err
    code, _, err = _run(capsys, ["mcu", "--theta-o", str(tmp_path / "none"), "--theta-p",
                                 str(tmp_path / "none"), "--out", str(tmp_path / "m")])
    assert code == 2 and "no finished model" in err
    for argv in (["train", "key=-1"], ["train", f"key={2 ** 64}"],
                 ["unlearn", "--theta-o", str(tmp_path / "none"), "--method", "ga", "--key",
                  str(2 ** 32)]):
        code, _, err = _run(capsys, [*argv, "--out", str(tmp_path / "k")])
        assert code == 2 and err.count("\n") == 1 and "key must be" in err, (argv, err)


@pytest.mark.parametrize("item, message", [
    ("train.epochs=1.5", "train.epochs: expected int, got '1.5'"),
    ("train.checkpoint_every=0", "checkpoint_every must be an int >= 1, got 0"),
    ("train.momentum=1.0", "momentum must be a number in [0, 1), got 1.0"),
])
def test_a_bad_train_field_is_one_line_before_any_folder(tmp_path, capsys, item, message):
    """A bad training setting is refused when the config is made, in one line naming it,
    before the data is loaded or the --out folder is bound to the request."""
    code, _, err = _run(capsys, ["train", "--out", str(tmp_path / "o"), item])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_non_finite_loss_is_one_line_with_the_way_on(tmp_path, capsys):
    """A diverging run stops with one line (exit 2) that says the last good checkpoint is
    kept and a new folder is needed for other settings, not with a traceback."""
    code, _, err = _run(capsys, ["train", "--out", str(tmp_path / "o"), "train.epochs=1",
                                 "train.lr=1e30", "train.progress=false"])
    assert code == 2 and err.count("\n") == 1, err
    assert "loss became" in err and "new one" in err


def test_fields_lists_what_overrides_can_set(capsys):
    code, out, _ = _run(capsys, ["mcu", "--fields"])  # needs none of the folders
    assert code == 0 and {"mcu.epochs", "mask.k", "selection.fold_bn", "key"} <= set(
        out.split())
    code, out, _ = _run(capsys, ["unlearn", "--method", "negtv", "--fields"])
    assert code == 0 and {"alpha", "epochs", "bn"} <= set(out.split())
    code, out, _ = _run(capsys, ["train", "--fields"])
    assert code == 0 and "train.epochs" in out.split()
    code, out, _ = _run(capsys, ["mask", "--fields"])
    assert code == 0 and out.split() == ["mask.enabled", "mask.k", "mask.k_r", "mask.batch_size",
                                         "mask.kind", "mask.seed", "mask.augment"]
    with pytest.raises(SystemExit) as info:  # without --fields the folders are required
        cli.main(["mcu", "--out", "x"])
    assert info.value.code == 2
    assert "--theta-o, --theta-p" in capsys.readouterr().err


def test_train_loads_the_pretrained_weights_it_names(tmp_path, capsys):
    """problem.pretrained reaches train_model: a missing file is one line naming it, and a
    file of weights is the start of training (zero epochs give exactly those weights)."""
    import jax
    import numpy as np

    from mcu_jax import checkpoint
    from mcu_jax.models import create, init_variables, save_npz

    missing = tmp_path / "nope.npz"
    code, _, err = _run(capsys, ["train", "--out", str(tmp_path / "o"), "train.epochs=1",
                                 f"problem.pretrained={missing}", "train.progress=false"])
    assert code == 2 and err.count("\n") == 1 and str(missing) in err, err
    start = init_variables(create("cnn_small", 10), jax.random.PRNGKey(7), (8, 8, 1))
    save_npz(start, tmp_path / "w.npz")
    code, out, _ = _run(capsys, ["train", "--out", str(tmp_path / "p"), "train.epochs=0",
                                 f"problem.pretrained={tmp_path / 'w.npz'}",
                                 "train.progress=false"])
    assert code == 0, out
    got, _ = checkpoint.load_model(tmp_path / "p")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unlearn_checks_its_request_before_loading_data(monkeypatch, tmp_path, capsys):
    """An unknown method or field is refused before the data set is built; --fields of an
    unknown method is one line too; a refused rerun names the field that differs."""
    from mcu_jax.problem import ProblemConfig

    monkeypatch.setattr(cli, "_load_theta_o", lambda path: ({}, {}, ProblemConfig()))

    def no_data(cfg):
        raise AssertionError("the data set was built before the request was checked")

    monkeypatch.setattr(cli.problem, "build", no_data)
    for argv in (["--method", "bogus"], ["--method", "ga", "nope=1"]):
        code, _, err = _run(capsys, ["unlearn", "--theta-o", "o", "--out", "p", *argv])
        assert code == 2 and err.count("\n") == 1, err
    code, _, err = _run(capsys, ["unlearn", "--method", "bogus", "--fields"])
    assert code == 2 and err.count("\n") == 1 and "bogus" in err, err


def test_a_refused_method_folder_names_the_field(tmp_path, capsys):
    code, _, _ = _run(capsys, ["train", "--out", str(tmp_path / "o"), "train.epochs=1",
                               "train.progress=false"])
    assert code == 0
    argv = ["unlearn", "--theta-o", str(tmp_path / "o"), "--method", "ga", "--out",
            str(tmp_path / "p"), "progress=false"]
    assert _run(capsys, [*argv, "epochs=1"])[0] == 0
    code, _, err = _run(capsys, [*argv, "epochs=2"])
    assert code == 2 and "config.epochs is 1 there but 2 now" in err, err


def test_unlearn_negtv_takes_the_data_sets_alpha(monkeypatch, capsys):
    """mcu-jax unlearn resolves NegTV's alpha for theta_o's scenario and data set (0.1 on
    Tiny-ImageNet), as the experiment runner does; an override still wins."""
    from types import SimpleNamespace

    from mcu_jax import methods
    from mcu_jax.problem import ProblemConfig

    seen = []
    pcfg = ProblemConfig(dataset="tinyimagenet", scenario="class")
    monkeypatch.setattr(cli, "_load_theta_o", lambda path: ({}, {}, pcfg))
    monkeypatch.setattr(cli.problem, "build", lambda cfg: SimpleNamespace(
        train=None, test=None, split=None, input_shape=(1,), model=None))
    monkeypatch.setattr(methods, "produce", lambda name, model, theta_o, data, mcfg, key, out:
                        seen.append(mcfg.alpha) or SimpleNamespace(minutes=0.0))
    for extra in ([], ["alpha=0.3"]):
        assert _run(capsys, ["unlearn", "--theta-o", "o", "--method", "negtv", "--out", "p",
                             *extra])[0] == 0
    assert seen == [0.1, 0.3]
    # ... and every method takes the data set's protocol (ImageNet-100: GA 2 epochs, lr 0.001).
    pcfg = ProblemConfig(dataset="imagenet100", scenario="random")
    monkeypatch.setattr(methods, "produce", lambda name, model, theta_o, data, mcfg, key, out:
                        seen.append((mcfg.epochs, mcfg.lr)) or SimpleNamespace(minutes=0.0))
    assert _run(capsys, ["unlearn", "--theta-o", "o", "--method", "ga", "--out", "p"])[0] == 0
    assert seen[-1] == (2, 0.001)


def test_override_parses_by_declared_type():
    cfg = config.override(MCUConfig(), ["epochs=3", "beta_values=0,0.2,0.6", "augment=no"])
    assert cfg.epochs == 3 and cfg.beta_values == (0.0, 0.2, 0.6) and cfg.augment is False
    with pytest.raises(ValueError, match="expected int"):
        config.override(MCUConfig(), ["epochs=three"])
    with pytest.raises(ValueError, match="field=value"):
        config.override(MCUConfig(), ["epochs"])
    for text in ("flase", "2", "maybe"):  # only the listed words are booleans
        with pytest.raises(ValueError, match="expected true/false"):
            config.override(MCUConfig(), [f"augment={text}"])
    with pytest.raises(ValueError, match="mcu.lr=0: lr must be a positive"):
        config.override(cli.MCUCommand(), ["mcu.lr=0"])


def test_fields_checked_together_may_come_in_any_order():
    """A group's assignments are applied together: a forget class and the class-wise
    scenario in either order, and back; a later assignment of a field wins; a refused
    combination names the group's assignments."""
    from mcu_jax.problem import ProblemConfig

    for order in (["problem.forget_class=3", "problem.scenario=class"],
                  ["problem.scenario=class", "problem.forget_class=3"]):
        cfg = config.override(cli.TrainCommand(), order)
        assert (cfg.problem.scenario, cfg.problem.forget_class) == ("class", 3)
    back = config.override(cfg, ["problem.scenario=random", "problem.forget_class=none"])
    assert (back.problem.scenario, back.problem.forget_class) == ("random", None)
    assert config.override(MCUConfig(), ["epochs=3", "epochs=4"]).epochs == 4
    with pytest.raises(ValueError, match="problem.forget_class=3: forget_class=3 given with "
                                         "scenario='random'"):
        config.override(cli.TrainCommand(), ["problem.forget_class=3"])
    with pytest.raises(ValueError, match="is a group of fields"):
        config.override(cli.TrainCommand(), ["problem=x", "problem.seed=1"])
    assert config.override(ProblemConfig(), []) == ProblemConfig()


def test_cli_passes_retrain_pool_and_key_to_the_library(monkeypatch, tmp_path, capsys):
    """`train retrain=true` trains on all of D_r; `mcu key=3` curves with PRNGKey(3)."""
    from types import SimpleNamespace

    import jax
    import numpy as np

    from mcu_jax import problem as problem_lib

    seen = {}

    def fake_train_model(model, images, pool, config, key, *args, **kwargs):
        seen["pool"] = np.asarray(pool)
        return {}, {"refs": {}, "minutes": 0.0}

    monkeypatch.setattr(cli.train, "train_model", fake_train_model)
    assert _run(capsys, ["train", "--out", str(tmp_path / "rt"), "retrain=true"])[0] == 0
    split = problem_lib.build(problem_lib.ProblemConfig()).split
    np.testing.assert_array_equal(seen["pool"], split.retain)

    monkeypatch.setattr(cli, "_load_theta_o", lambda path: (
        {}, {"refs": {"train": 99.0, "val": 95.0}}, problem_lib.ProblemConfig()))
    monkeypatch.setattr(cli.checkpoint, "load_model", lambda path: ({}, {}))

    def fake_run_mcu(model, theta_o, theta_p, train, test, split, refs, key, *args, **kwargs):
        seen["key"] = np.asarray(jax.random.key_data(key))
        return SimpleNamespace(t_star=1.0, region=[], measured={}, measured_gap=0.0,
                               minutes={})

    monkeypatch.setattr(cli.pipeline, "run_mcu", fake_run_mcu)
    argv = ["mcu", "--theta-o", "o", "--theta-p", "p", "--out", str(tmp_path / "m"), "key=3"]
    assert _run(capsys, argv)[0] == 0
    np.testing.assert_array_equal(seen["key"], jax.random.key_data(jax.random.PRNGKey(3)))


def test_mcu_takes_the_papers_curve_training_for_theta_os_problem(monkeypatch, tmp_path,
                                                                   capsys):
    """mcu-jax mcu trains the curve 10 epochs for random forgetting and 5 class-wise (the
    paper's CIFAR-10 protocol, which digits follows), 2 on ImageNet-100; an override wins."""
    from types import SimpleNamespace

    from mcu_jax.problem import ProblemConfig

    seen = []
    monkeypatch.setattr(cli.checkpoint, "load_model", lambda path: ({}, {}))
    monkeypatch.setattr(cli.problem, "build", lambda cfg: SimpleNamespace(
        model=None, train=None, test=None, split=None))
    monkeypatch.setattr(cli.pipeline, "run_mcu", lambda *args, **kwargs: seen.append(
        args[8].epochs) or SimpleNamespace(t_star=1.0, region=[], measured={},
                                           measured_gap=0.0, minutes={}))
    argv = ["mcu", "--theta-o", "o", "--theta-p", "p", "--out", str(tmp_path / "m")]
    for dataset, scenario, extra in [("digits", "random", []), ("digits", "class", []),
                                     ("imagenet100", "class", []),
                                     ("digits", "class", ["mcu.epochs=7"])]:
        pcfg = ProblemConfig(dataset=dataset, scenario=scenario)
        monkeypatch.setattr(cli, "_load_theta_o", lambda path, p=pcfg: ({}, {"refs": {}}, p))
        assert _run(capsys, [*argv, *extra])[0] == 0
    assert seen == [10, 5, 2, 7]


def test_options_and_overrides_in_any_order():
    """Overrides may follow options and options overrides, as with run.py; the overrides
    keep their order (a later one wins), and an unknown option is still refused."""
    parser = cli._parser()
    args = cli._parse_args(parser, ["mask", "mask.k=0.1", "--theta-o", "T", "mask.k_r=0.2",
                                   "--out", "O", "mask.k=0.3"])
    assert (args.theta_o, str(args.out)) == ("T", "O")
    assert args.overrides == ["mask.k=0.1", "mask.k_r=0.2", "mask.k=0.3"]
    assert config.override(cli.MaskCommand(), args.overrides).mask.k == 0.3
    for argv in (["mask", "--out", "O", "mask.k=0.1", "--nope"],
                 ["mask", "mask.k=0.1", "--out", "O", "stray"]):
        with pytest.raises(SystemExit):
            cli._parse_args(parser, argv)
