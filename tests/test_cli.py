"""The command line: train -> unlearn -> mcu on digits, overrides and one-line errors."""

import json

import pytest

from mcu_jax import cli, config
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


def test_user_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, ["train", "--out", str(tmp_path / "o"), "train.epoch=2"])
    assert code == 2
    assert err.count("\n") == 1 and "unknown config field 'train.epoch'" in err
    code, _, err = _run(capsys, ["mcu", "--theta-o", str(tmp_path / "none"), "--theta-p",
                                 str(tmp_path / "none"), "--out", str(tmp_path / "m")])
    assert code == 2 and "no finished model" in err


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
    with pytest.raises(SystemExit) as info:  # without --fields the folders are required
        cli.main(["mcu", "--out", "x"])
    assert info.value.code == 2
    assert "--theta-o, --theta-p" in capsys.readouterr().err


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
