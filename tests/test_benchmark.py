"""experiments/benchmark.py runs on CPU at tiny sizes and prints the expected table.

This checks the tool, not speed: timings come from running the benchmark (docs/benchmarks.md).
"""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    path = ROOT / "experiments" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("mcu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--model", "cnn_small", "--train-images", "192", "--batch-size", "32",
        "--mask-images", "64", "--sweep-images", "96", "--eval-batch-size", "64",
        "--bn-batch-size", "32"]


def _cnn_small_sizes() -> dict[str, int]:
    """cnn_small's tensor sizes by path (10 classes, 8x8x1 input)."""
    import jax

    from mcu_jax import pytrees
    from mcu_jax.models import create, init_variables

    variables = init_variables(create("cnn_small", 10), jax.random.PRNGKey(0), (8, 8, 1))
    return {p: v.size for p, v in pytrees.flatten(variables["params"]).items()}


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_step_and_sweep_table(benchmark, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    out = benchmark.main(TINY + [
        "--steps", "4", "--warmup", "1", "--steps-per-call", "2", "--num-t", "3",
        "--mask", "0.1", "--compare-strategies", "--chunk-size", "2", "--scan",
        "--save-mask", str(tmp_path / "mask.json"),
        "--profile", str(tmp_path / "trace"), "--json", str(out_json),
    ])
    text = capsys.readouterr().out
    assert "# mcu-jax benchmark" in text and "jax " in text and "device:" in text
    rows = _table_rows(text)
    assert rows[0] == list(benchmark.COLUMNS)
    body = rows[2:]
    assert [r[0] for r in body] == ["curve step", "sweep", "sweep", "sweep"]
    assert all(len(r) == len(benchmark.COLUMNS) for r in body)
    step = out["rows"][0]["numbers"]
    assert step["steps"] == 4 and step["step_ms"] > 0 and step["compile_s"] >= 0
    assert 0 < step["trained_fraction"] <= 1
    # --save-mask wrote the mask the step trained with.
    saved = json.loads((tmp_path / "mask.json").read_text())
    sizes = _cnn_small_sizes()
    kept = sum(sizes[p] for p, m in saved.items() if m)
    assert kept / sum(sizes.values()) == pytest.approx(step["trained_fraction"])
    assert "ms/step" in body[0][3] and "img/s" in body[0][4]
    strategies = [(r["numbers"]["strategy"], r["numbers"]["chunk_size"]) for r in out["rows"][1:]]
    assert strategies == [("map", None), ("vmap", None), ("vmap", 2)]
    for r in out["rows"][1:]:
        assert r["numbers"]["image_forwards"] == 3 * 2 * 96
        assert r["numbers"]["sweep_s"] > 0
    # CPU has no memory statistics.
    assert body[0][5] == "n/a"
    saved = json.loads(out_json.read_text())
    assert saved["meta"]["jax"] and len(saved["rows"]) == 4
    # One trace folder per timed region, none for the compiling first calls.
    traced = sorted(p.name for p in (tmp_path / "trace").iterdir())
    assert traced == ["curve_step_timed", "sweep_map_timed", "sweep_vmap_timed"]
    assert all(any((tmp_path / "trace" / t).rglob("*.trace.json.gz")) for t in traced)


def test_end_to_end_row(benchmark, capsys):
    out = benchmark.main(TINY + [
        "--skip-step", "--skip-sweep", "--end-to-end", "--retain", "96", "--forget", "32",
        "--test", "40", "--epochs", "1", "--num-t", "4", "--mask", "paper", "--precompile",
        "--fold-bn", "--fused-bn",
    ])
    captured = capsys.readouterr()
    rows = _table_rows(captured.out)[2:]
    assert [r[0] for r in rows] == ["end-to-end"]
    assert "BN folded for evaluation" in rows[0][1] and "fused BatchNorm" in rows[0][1]
    # Each phase is reported as it finishes (a run cut short still shows where time went).
    for phase in ("mask done", "curve training done", "sweep over 4 t done", "selection",
                  "sweep programs compiled in the background"):
        assert f"[benchmark] end-to-end: run_mcu: {phase}" in captured.err
    numbers = out["rows"][0]["numbers"]
    assert set(numbers["phases_s"]) == {"mask", "curve", "selection"}
    assert numbers["steps"] == 2  # (48 retain-subset + 32 forget) // 32
    assert numbers["total_s"] >= sum(numbers["phases_s"].values()) * 0.99


def test_arguments(benchmark):
    assert benchmark.parse_mask("none") is None
    assert benchmark.parse_mask("paper") == (0.5, 0.1)
    assert benchmark.parse_mask("0.1") == (0.1, 0.1)
    assert benchmark.parse_mask("0.3,0.05") == (0.3, 0.05)
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark.parse_mask("1.5")
    assert benchmark.default_chunk(20) == 5
    assert benchmark.default_chunk(3) == 1
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--end-to-end", "--num-t", "3"])
    with pytest.raises(SystemExit):  # a model without BatchNorm
        benchmark.parse_args(["--model", "vit_small", "--fused-bn"])
    with pytest.raises(SystemExit):  # a model without 1x1 convolutions
        benchmark.parse_args(["--model", "cnn_small", "--pointwise", "fused"])
    args = benchmark.parse_args([])
    assert args.pointwise == "conv"
    assert (args.model, args.batch_size, args.num_t, args.sweep_images) == (
        "preresnet110", 128, 20, 6000)
    assert benchmark.input_shape(args) == (32, 32, 3)


def test_trained_models_and_a_mask_file(benchmark, tmp_path, capsys):
    """--theta-o/--theta-p load model folders (checked against --model) and --mask FILE times
    the step with a saved mask, e.g. the one an MCU run computed on a trained model."""
    import jax
    import numpy as np

    from mcu_jax import checkpoint, masks, pytrees
    from mcu_jax.models import create, init_variables

    model = create("cnn_small", 10)
    folders = {}
    for i, name in enumerate(("theta_o", "theta_p")):
        folders[name] = tmp_path / name
        checkpoint.save_model(folders[name], init_variables(model, jax.random.PRNGKey(7 + i),
                                                            (8, 8, 1)))
    loaded = benchmark.initial_variables(str(folders["theta_o"]), model, None, (8, 8, 1), "x")
    expected = init_variables(model, jax.random.PRNGKey(7), (8, 8, 1))
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, expected))

    sizes = _cnn_small_sizes()
    head = "head/kernel"
    masks.save(pytrees.unflatten(expected["params"], {p: p == head for p in sizes}),
               tmp_path / "mask.json")
    out = benchmark.main(TINY + [
        "--skip-sweep", "--steps", "2", "--warmup", "0", "--steps-per-call", "1",
        "--theta-o", str(folders["theta_o"]), "--theta-p", str(folders["theta_p"]),
        "--mask", str(tmp_path / "mask.json"),
    ])
    text = capsys.readouterr().out
    assert f"theta_o from {folders['theta_o']}, theta_p from {folders['theta_p']}" in text
    step = out["rows"][0]
    assert f"mask from {tmp_path / 'mask.json'}" in step["setting"]
    assert step["numbers"]["trained_fraction"] == pytest.approx(sizes[head] / sum(sizes.values()))

    # Another model's folder, a missing folder, a missing mask file: refused, named.
    other = tmp_path / "other"
    checkpoint.save_model(other, init_variables(create("cnn_small", 3), jax.random.PRNGKey(0),
                                                (8, 8, 1)))
    with pytest.raises(ValueError, match="--theta-p"):
        benchmark.main(TINY + ["--skip-sweep", "--steps", "1", "--theta-p", str(other)])
    for argv, message in (
        (["--theta-o", str(tmp_path / "none")], "--theta-o: no finished model in"),
        (["--mask", str(tmp_path / "none.json")], "--mask: no mask file at"),
        (["--mask", str(tmp_path / "mask.json"), "--end-to-end"], "times the step only"),
    ):
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_fused_1x1_kernel_in_every_part(benchmark, monkeypatch, capsys):
    """--pointwise fused is the model's setting, so the step and the sweep both run the model
    with it (on the CPU as XLA's ops, differentiated by autodiff: the kernels themselves are
    tested in test_pointwise.py); so does --conv3x3 fused."""
    import functools

    from mcu_jax import models

    monkeypatch.setitem(models._REGISTRY, "preresnet11_bench_test",
                        functools.partial(models.PreResNet, depth=11))
    out = benchmark.main(TINY + [
        "--model", "preresnet11_bench_test", "--image-size", "8", "--steps", "2",
        "--warmup", "0", "--steps-per-call", "1", "--num-t", "2", "--pointwise", "fused",
        "--conv3x3", "fused",
    ])
    args = benchmark.parse_args(["--model", "preresnet11_bench_test", "--pointwise", "fused"])
    assert benchmark.model_of(args).pointwise == "fused"
    both = benchmark.parse_args(["--model", "preresnet11_bench_test", "--pointwise", "fused",
                                 "--conv3x3", "fused"])
    assert benchmark.model_of(both).conv3x3 == "fused"
    assert benchmark.mcu_config(args).combine == "auto"
    xla = benchmark.parse_args(["--combine", "xla"])
    assert benchmark.mcu_config(xla, epochs=3).combine == "xla"
    assert benchmark.combine_text(xla) and not benchmark.combine_text(args)
    rows = out["rows"]
    assert [r["part"] for r in rows] == ["curve step", "sweep"]
    assert all("fused 1x1 kernel" in r["setting"] for r in rows)
    assert all("fused 3x3 kernel" in r["setting"] for r in rows)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--conv3x3", "fused"])
    assert "needs --pointwise fused" in capsys.readouterr().err
    assert rows[0]["numbers"]["step_ms"] > 0
    capsys.readouterr()
