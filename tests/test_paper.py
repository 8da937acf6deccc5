"""experiments/paper.py: the suites, the overrides each config gets, the index of tables and
figures (runs faked here; the configs' own runs are tested in test_experiment)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import paper  # noqa: E402
import run as run_script  # noqa: E402


def test_every_suite_names_existing_configs_and_each_paper_item_once():
    for suite, entries in paper.SUITES.items():
        names = [name for _, name in entries]
        assert len(set(names)) == len(names), suite
        for name in names:
            run_script.load_config(name)
    for suite in ("digits", "cifar10"):
        items = " ".join(item for item, _ in paper.SUITES[suite])
        for wanted in ("Tables 1-2", "Table 3", "Figure 2", "Figure 3a", "Figure 3b",
                       "Figure 4", "Figure 5", "Figure 6", "Figure 7", "Figures 8-9"):
            assert wanted in items, (suite, wanted)
    # The digits suite's Tables 1-2 run all six methods with MCU and MCU_beta.
    methods = run_script.load_config("digits_methods")
    assert set(methods.methods) == {"ft", "rl", "ga", "neggrad", "salun", "negtv"}
    assert methods.mcu_modes == ("fixed", "adaptive") and methods.fixed_betas
    assert [n for _, n in paper.SUITES["all"][-2:]] == ["tinyimagenet_vgg16bn_random",
                                                        "imagenet100_vit_random"]


def test_overrides_reach_an_ablations_experiment():
    exp = run_script.load_config("digits_random")
    abl = run_script.load_config("digits_ablation_k")
    given = ["seeds=0", "method=rl", "experiment.mia=false"]
    assert paper.overrides_for(exp, ["seeds=0"], "D", "O") == [
        "problem.data_dir=D", "out_dir=O", "seeds=0"]
    assert paper.overrides_for(abl, given, "D", None) == [
        "experiment.problem.data_dir=D", "experiment.seeds=0", "method=rl",
        "experiment.mia=false"]


def test_a_setting_that_fine_tunes_pretrained_weights_needs_them(tmp_path, monkeypatch,
                                                                 capsys):
    """ImageNet-100's ViT fine-tunes pretrained weights: without a file the suite is refused
    before anything runs (not trained from random weights), and ``--pretrained`` reaches
    that config only."""
    from mcu_jax import problem

    calls = []
    monkeypatch.setattr(run_script, "run", _fake_run(calls))
    vit = run_script.load_config("imagenet100_vit_random")
    assert vit.problem.pretrained == problem.PRETRAINED_REQUIRED
    with pytest.raises(ValueError, match="problem.pretrained=FILE.npz"):
        problem.check(vit.problem)
    assert paper.main(["all", "--out-dir", str(tmp_path)]) == 2
    assert "imagenet100_vit_random" in capsys.readouterr().err and calls == []
    assert paper.overrides_for(vit, [], None, None, "V.npz") == ["problem.pretrained=V.npz"]
    cifar = run_script.load_config("cifar10_preresnet110_random")
    assert paper.overrides_for(cifar, [], None, None, "V.npz") == []
    assert paper.main(["all", "--pretrained", "V.npz", "--out-dir", str(tmp_path)]) == 0
    assert calls[-1][0] == "imagenet100_vit_random"


def _fake_run(calls):
    def run(cfg):
        exp = getattr(cfg, "experiment", cfg)
        calls.append((exp.name, exp.seeds, exp.out_dir))
        folder = Path(exp.out_dir) / exp.name
        (folder / "curves").mkdir(parents=True, exist_ok=True)
        (folder / "results.md").write_text(f"# {exp.name}\n\n| Methods |\n")
        (folder / "curves" / "c.png").write_bytes(b"png")
        return folder
    return run


def test_suite_runs_its_configs_in_order_and_indexes_them(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(run_script, "run", _fake_run(calls))
    out = tmp_path / "o"
    assert paper.main(["digits", "seeds=0", "--out-dir", str(out)]) == 0
    assert [c[0] for c in calls] == [name for _, name in paper.SUITES["digits"]]
    assert all(c[1] == (0,) and c[2] == str(out) for c in calls)
    index = (out / "paper_digits.md").read_text()
    assert "## Figure 2 (the parameter mask" in index and "### digits_ablation_mask" in index
    assert "![c](digits_random/curves/c.png)" in index
    assert f"Command: `python experiments/paper.py digits seeds=0 --out-dir {out}`" in index
    assert "tables and figures:" in capsys.readouterr().out


def test_only_runs_the_named_configs_and_lists_the_rest(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run_script, "run", _fake_run(calls))
    # No suite named: digits; the override after --only is an override, not a config name.
    assert paper.main(["--only", "digits_class,digits_ablation_k", "seeds=1",
                       "--out-dir", str(tmp_path)]) == 0
    assert [c[:2] for c in calls] == [("digits_class", (1,)), ("digits_ablation_k", (1,))]
    index = (tmp_path / "paper_digits.md").read_text()
    assert "### digits_class" in index
    assert "Not run yet (`python experiments/run.py digits_random`)" in index
    calls.clear()
    assert paper.main(["cifar10", "--only", "cifar10_preresnet110_class",
                       "--out-dir", str(tmp_path)]) == 0
    index = (tmp_path / "paper_cifar10.md").read_text()  # the hint names the data folder
    assert ("Not run yet (`python experiments/run.py cifar10_preresnet110_random "
            "problem.data_dir=DIR`)") in index


@pytest.mark.parametrize("argv, message", [
    (["digits", "--only", "nope"], "--only ['nope'] not in the suite"),
    (["digits", "mcu.epoch=3"], "error in digits_random: unknown config field"),
])
def test_bad_requests_stop_before_any_run(argv, message, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(run_script, "run", _fake_run(calls))
    assert paper.main(argv) == 2
    assert message in capsys.readouterr().err and not calls


def test_an_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        paper.main(["cifar100"])
    assert info.value.code == 2 and "unknown suite 'cifar100'" in capsys.readouterr().err


def test_a_folder_of_another_request_is_not_called_resumable(tmp_path, monkeypatch, capsys):
    from mcu_jax import runs

    def mismatch(cfg):
        raise runs.RequestMismatch("run folder x was made with a different config")

    monkeypatch.setattr(run_script, "run", mismatch)
    assert paper.main(["digits", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "made with a different config" in err and "resume" not in err


def test_a_failing_run_stops_the_suite_with_one_line(tmp_path, monkeypatch, capsys):
    def failing(cfg):
        raise FileNotFoundError("load_dataset('cifar10'): no data found")

    monkeypatch.setattr(run_script, "run", failing)
    assert paper.main(["cifar10", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error in cifar10_preresnet110_random: load_dataset" in err
    assert "repeat the command to resume" in err
