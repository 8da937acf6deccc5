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


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_step_and_sweep_table(benchmark, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    out = benchmark.main(TINY + [
        "--steps", "4", "--warmup", "1", "--steps-per-call", "2", "--num-t", "3",
        "--mask", "0.1", "--compare-strategies", "--chunk-size", "2", "--scan",
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
        "--fold-bn",
    ])
    captured = capsys.readouterr()
    rows = _table_rows(captured.out)[2:]
    assert [r[0] for r in rows] == ["end-to-end"]
    assert "BN folded for evaluation" in rows[0][1]
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
    args = benchmark.parse_args([])
    assert (args.model, args.batch_size, args.num_t, args.sweep_images) == (
        "preresnet110", 128, 20, 6000)
    assert benchmark.input_shape(args) == (32, 32, 3)
