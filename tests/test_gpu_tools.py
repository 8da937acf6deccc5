"""The helpers of the GPU check: gpu_summary.py (targets and ratios from a run's files) and
profile_summary.py (where a trace's device time goes), on hand-made inputs whose answers are
known."""

import functools
import gzip
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from mcu_jax import models

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_summary():
    return _load("gpu_summary")


@pytest.fixture(scope="module")
def profile_summary():
    return _load("profile_summary")


STANDARD = {"model": "preresnet110", "batch_size": 128}


def _part(name, step_ms=None, sweep=None, flags="", args=STANDARD):
    rows = []
    if step_ms is not None:
        rows.append({"part": "curve step", "setting": "s", "numbers": {"step_ms": step_ms}})
    if sweep is not None:
        seconds, forwards = sweep
        rows.append({"part": "sweep", "setting": "w", "numbers": {
            "sweep_s": seconds, "image_forwards": forwards, "compile_s": 1.0,
            "image_forwards_per_s": forwards / seconds}})
    return {"part": name, "xla_flags": flags, "meta": {"device": "Test GPU"}, "args": args,
            "rows": rows}


def test_gpu_summary_targets_and_ratios(gpu_summary, tmp_path):
    parts = [_part("f32", 10.0, (8.0, 240000)), _part("bf16", 4.0, (1.0, 240000)),
             _part("f32_k01", 6.0), _part("fold", sweep=(6.0, 240000)), _part("fused", 8.0),
             _part("pointwise_step", 7.0), _part("pointwise_step_bf16", 3.0),
             _part("conv3x3_step", 5.6), _part("conv3x3_step_bf16", 2.7),
             _part("combine_xla", 10.5), _part("pointwise", sweep=(2.0, 240000)),
             _part("pointwise_bf16", sweep=(0.5, 240000)),
             _part("conv3x3_bf16", sweep=(0.4, 240000)),
             _part("unfolded_bf16", sweep=(0.44, 240000)), _part("sweep_map", sweep=(4.0, 240000),
                   args={**STANDARD, "bn_group": 16, "eval_batch_size": 2000})]
    (tmp_path / "parts.jsonl").write_text("\n".join(json.dumps(p) for p in parts) + "\n")
    ref = {"step_ms": 100.0, "sweep_img_fwd_per_s": 3000.0, "sweep_t": 3, "sweep_s": 12.0,
           "device": "Test GPU", "torch": "2.x"}
    (tmp_path / "reference.json").write_text("progress noise\n" + json.dumps(ref) + "\n")
    text = gpu_summary.summary(tmp_path)
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "10.00 ms (10.0x the release's float32)" in lines["curve step <= 5 ms (float32)"]
    assert "NOT met" in lines["curve step <= 5 ms (float32)"]
    assert "4.00 ms (25.0x the release's float32)" in lines["curve step <= 5 ms (bfloat16)"]
    assert "| met |" in lines["curve step <= 5 ms (bfloat16)"]
    assert ("8.00 ms (12.5x the release's float32); 0.80 of the unfused float32 step"
            in lines["curve step <= 5 ms (float32, fused BatchNorm)"])
    assert ("7.00 ms (14.3x the release's float32); 0.70 of the float32 step with nn.Conv"
            in lines["curve step <= 5 ms (float32, fused 1x1 kernel)"])
    assert "3.00 ms (33.3x the release's float32); 0.75 of the bfloat16 step with nn.Conv" in (
        lines["curve step <= 5 ms (bfloat16, fused 1x1 kernel)"])
    assert "5.60 ms (17.9x the release's float32); 0.80 of the fused 1x1 kernel's step with " \
           "cuDNN's 3x3 convolutions | NOT met" in lines[
               "curve step <= 5 ms (float32, fused 1x1 and 3x3 kernels)"]
    assert "2.70 ms (37.0x the release's float32); 0.90 of the bfloat16 fused 1x1 kernel's " \
           "step with cuDNN's 3x3 convolutions | met" in lines[
               "curve step <= 5 ms (bfloat16, fused 1x1 and 3x3 kernels)"]
    assert "10.50 ms (9.5x the release's float32); 1.50 of the fused 1x1 kernel's step with " \
           "the curve point's kernel" in lines["curve step <= 5 ms (float32, fused 1x1 kernel, " \
                                               "the curve point by XLA's sums)"]
    # 240,000 forwards in 8 s = 30,000/s = 10x the release's 3,000/s
    assert "8 s, 30,000 img-fwd/s (10.0x the release's float32)" in lines[
        "20-point sweep <= 1.1 s (float32)"]
    assert "| met |" in lines["20-point sweep <= 1.1 s (bfloat16)"]
    assert "6 s, 40,000 img-fwd/s (13.3x the release's float32); 1.50 of the unfolded sweep" in (
        lines["20-point sweep <= 1.1 s (float32, map over t, 16 BN batches at once, eval batch "
              "2000, BN folded for evaluation)"])
    assert ("2 s, 120,000 img-fwd/s (40.0x the release's float32); 0.50 of the sweep with "
            "nn.Conv") in lines["20-point sweep <= 1.1 s (float32, map over t, 16 BN batches at "
                                "once, eval batch 2000, fused 1x1 kernel)"]
    best = lines["20-point sweep <= 1.1 s (bfloat16, map over t, 46 BN batches at once, eval "
                 "batch 6000, BN folded for evaluation, fused 1x1 kernel)"]
    assert "0.5 s, 480,000 img-fwd/s (160.0x the release's float32); 0.50 of the bfloat16 " \
           "sweep | met |" in best
    assert "0.80 of the sweep with cuDNN's 3x3 convolutions | met |" in lines[
        "20-point sweep <= 1.1 s (bfloat16, map over t, 46 BN batches at once, eval batch 6000, "
        "BN folded for evaluation, fused 1x1 kernel, fused 3x3 kernel)"]
    assert "1.10 of the folded sweep (with the chain kernel) | met |" in lines[
        "20-point sweep <= 1.1 s (bfloat16, map over t, 46 BN batches at once, eval batch 6000, "
        "fused 1x1 kernel, fused 3x3 kernel)"]
    assert "4 s, 60,000 img-fwd/s (20.0x the release's float32); 0.50 of the float32 sweep" in (
        lines["20-point sweep <= 1.1 s (float32, map over t, 16 BN batches at once, eval "
              "batch 2000)"])
    masked = lines["masked step <= half the unmasked (float32)"]
    assert "6.00 / 10.00 ms = 0.60" in masked and "NOT met" in masked
    assert "not measured" in lines["masked step <= half the unmasked (bfloat16)"]
    assert "not measured" in lines["end-to-end MCU phase <= 60 s"]
    assert "not measured" in lines["end-to-end MCU phase <= 60 s, sweep compiled in the background"]
    assert "not measured" in lines["end-to-end MCU phase <= 60 s, compilation cache warm"]
    assert "not measured" in lines["end-to-end MCU phase <= 60 s, every speed option"]


def test_gpu_summary_judges_end_to_end_on_the_protocol_only(gpu_summary, tmp_path):
    def e2e(name, steps, setting):
        return {"part": name, "xla_flags": "", "meta": {"device": "Test GPU"},
                "args": STANDARD, "rows": [
            {"part": "end-to-end", "setting": setting, "numbers": {
                "total_s": 50.0, "steps": steps,
                "phases_s": {"mask": 5.0, "curve": 20.0, "selection": 25.0}}}]}

    parts = [e2e("e2e", 2140, "preresnet110 float32, D_r 45,000, D_f 5,000, test 10,000"),
             e2e("e2e_warm", 20, "cnn_small float32, D_r 1,293, D_f 144, test 360"),
             e2e("e2e_fast_warm", 2140, "preresnet110 bfloat16, fused BatchNorm, D_r 45,000, "
                 "D_f 5,000, test 10,000")]
    (tmp_path / "parts.jsonl").write_text("\n".join(json.dumps(p) for p in parts) + "\n")
    lines = {ln.split("|")[1].strip(): ln for ln in gpu_summary.summary(tmp_path).splitlines()
             if ln.startswith("| ")}
    assert "| met |" in lines["end-to-end MCU phase <= 60 s"]
    assert "| not the protocol workload |" in lines[
        "end-to-end MCU phase <= 60 s, compilation cache warm"]
    assert "| met |" in lines[
        "end-to-end MCU phase <= 60 s, every speed option, compilation cache warm"]


def test_gpu_summary_judges_targets_on_the_issues_workload_only(gpu_summary, tmp_path):
    """A dry run with a small model is reported, not judged (it printed 'NOT met' for a
    cnn_small step against the PreResNet-110 target)."""
    small = {"model": "cnn_small", "batch_size": 128}
    parts = [_part("f32", 2.0, (0.5, 240000), args=small), _part("f32_k01", 1.0, args=small)]
    (tmp_path / "parts.jsonl").write_text("\n".join(json.dumps(p) for p in parts) + "\n")
    lines = {ln.split("|")[1].strip(): ln for ln in gpu_summary.summary(tmp_path).splitlines()
             if ln.startswith("| ")}
    for row in ("curve step <= 5 ms (float32)", "20-point sweep <= 1.1 s (float32)",
                "masked step <= half the unmasked (float32)"):
        assert "| not the issue's workload |" in lines[row], lines[row]


def test_gpu_summary_gives_no_ratio_across_cards(gpu_summary, tmp_path):
    (tmp_path / "parts.jsonl").write_text(json.dumps(_part("f32", 10.0, (8.0, 240000))) + "\n")
    ref = {"step_ms": 100.0, "sweep_img_fwd_per_s": 3000.0, "sweep_t": 3, "sweep_s": 12.0,
           "device": "cpu", "torch": "2.x"}  # torch without CUDA falls back to the CPU
    (tmp_path / "reference.json").write_text(json.dumps(ref) + "\n")
    text = gpu_summary.summary(tmp_path)
    assert "no ratios: the release ran on 'cpu', mcu-jax on 'Test GPU'" in text
    assert "x the release" not in text


def test_gpu_summary_without_files(gpu_summary, tmp_path):
    text = gpu_summary.summary(tmp_path)
    assert "parts measured: none" in text and "not measured in this call" in text


def _trace(path: Path, events):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_profile_summary_counts_stream_kernels_inside_timed_regions(profile_summary, tmp_path):
    kernel = {"ph": "X", "pid": 1, "tid": 7}
    events = [
        {"ph": "X", "pid": 2, "tid": 1, "name": "curve_step/timed", "ts": 100.0, "dur": 100.0},
        {"ph": "X", "pid": 2, "tid": 1, "name": "curve_step/first_call", "ts": 0.0, "dur": 90.0},
        {**kernel, "name": "conv_fwd<float, 3>(args)", "ts": 110.0, "dur": 20.0},
        {**kernel, "name": "conv_fwd<float, 5>(other)", "ts": 120.0, "dur": 20.0},  # overlaps
        {**kernel, "name": "loop_add_fusion", "ts": 150.0, "dur": 10.0},
        {**kernel, "name": "before_region", "ts": 10.0, "dur": 10.0},
        {"ph": "X", "pid": 1, "tid": 8, "name": "derived op", "ts": 110.0, "dur": 50.0},
    ]
    _trace(tmp_path / "curve_step_timed" / "x" / "h.trace.json.gz", events)
    text = profile_summary.summary(tmp_path, top=1)
    assert "### curve_step/timed: 0.1 ms wall" in text
    # Kernels inside the region: 3 (the derived line and the earlier kernel are left out);
    # busy = union [110, 140) + [150, 160) = 40 us of 100 us wall.
    assert "kernels: 3; device busy 0.0 ms (40% of the wall time); mean kernel 16.7 us" in text
    assert "| `conv_fwd<>()` | 2 | 0.04 | 80.0% | 20.0 |" in text
    assert "| (1 other names) | 1 | 0.01 | 20.0% | 10.0 |" in text
    assert "first_call" not in text


def test_profile_summary_of_a_cpu_trace(profile_summary, tmp_path):
    path = tmp_path / "t" / "h.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 2, "tid": 1, "name": "curve_step/timed", "ts": 0, "dur": 5}]}, f)
    assert "no device stream lines" in profile_summary.summary(tmp_path)
    with pytest.raises(SystemExit, match="no \\*.trace.json.gz"):
        profile_summary.summary(tmp_path / "t" / "missing_dir_is_not_a_file")


def test_busy_time_is_the_union_of_intervals(profile_summary):
    assert profile_summary.busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert profile_summary.busy_time([]) == 0


@pytest.fixture(scope="module")
def compare_runs():
    return _load("compare_runs")


def _results(path: Path, rows: dict[str, dict[str, float]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": {}, "rows": [
        {"method": m, **{k: {"mean": v, "std": 0.0, "values": [v]} for k, v in metrics.items()}}
        for m, metrics in rows.items()]}))
    return path


def test_compare_runs_reports_every_shared_metric(compare_runs, tmp_path, capsys):
    a = _results(tmp_path / "results_float32.json",
                 {"RT": {"UA": 5.0, "RA": 99.0, "TA": 90.0, "MIA": 7.0, "avg_gap": 0.0,
                         "UA_test": 100.0},
                  "FT": {"UA": 3.0}})
    b = _results(tmp_path / "results_bfloat16.json",
                 {"RT": {"UA": 5.25, "RA": 98.0, "TA": 90.0, "MIA": 7.0, "avg_gap": 9.0},
                  "GA": {"UA": 1.0}})
    text, worst = compare_runs.compare(compare_runs.load_rows(a), compare_runs.load_rows(b), 0.5)
    assert worst == pytest.approx(1.0)  # RA; avg_gap is not an accuracy and is left out
    assert "| RT | UA | 5.00 | 5.25 | 0.25 |" in text
    assert "| RT | RA | 99.00 | 98.00 | 1.00 **over** |" in text
    assert "rows in only one run: FT, GA" in text
    assert "metrics in only one run: RT UA_test" in text
    assert "largest difference: 1.00 points, NOT within the tolerance of 0.5 points" in text
    compare_runs.main([str(a), str(b), "--tolerance", "1"])
    out = capsys.readouterr().out
    assert "| row | metric | results_float32 | results_bfloat16 |" in out
    assert "within the tolerance of 1 points" in out
    with pytest.raises(SystemExit, match="does not exist"):
        compare_runs.load_rows(tmp_path / "missing.json")


def test_cost_analysis_counts_the_programs(capsys):
    cost = _load("cost_analysis")
    text = cost.main(["--model", "cnn_small", "--batch-size", "16", "--eval-batch", "32",
                      "--num-t", "2", "--sweep-images", "10"])
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "curve step (batch 16)", "train-mode forward (batch 16)",
        "eval-mode forward (batch 32)", "eval-mode forward (batch 32, BN folded)",
        "sweep (2 t x (10 BN + 10 eval images))", "curve step (batch 16, fused BatchNorm)",
        "train-mode forward (batch 16, fused BatchNorm)"]
    assert "no cuDNN convolutions (not a GPU)" in text
    # The fused step's share of the unfused step's bytes: fewer.
    step_note = rows[5].split("|")[8].strip()
    assert " of the unfused step's FLOPs, " in step_note and step_note.endswith(" kernels")
    assert float(step_note.split(", ")[1].split(" of its")[0]) < 1.0
    # The fused train-mode pass (the sweep's BatchNorm pass) against the unfused one.
    assert " of the unfused pass's FLOPs, " in rows[6].split("|")[8]
    step = cost.analyse("cnn_small", 16, "float32", 32)
    assert all(r["flops"] > 0 and r["bytes"] > 0 for r in step)
    # Kernel counts: the step launches more kernels than a forward pass.
    assert step[0]["kernels"] > step[1]["kernels"] > 0
    assert rows[0].split("|")[7].strip() == f"{step[0]['kernels']} ({step[0]['tiny']})"
    # each compiled program's build times (trace + lower, compile) from a cleared cache; the
    # sweep row is a sum of two programs' costs, compiled for no build of its own
    trace_lower, compile_s = step[0]["build"]
    assert trace_lower > 0 and compile_s > 0
    assert re.fullmatch(r"\d+\.\d s, \d+\.\d s", rows[0].split("|")[9].strip())
    assert rows[4].split("|")[9].strip() == "-"
    assert step[3]["flops"] == pytest.approx(step[2]["flops"], rel=0.05)  # the same work
    # A backward pass costs more than the forward passes of the same batch.
    assert step[0]["flops"] > 16 * step[1]["flops"]
    sweep = cost.sweep_row(step, 2, 10)
    assert sweep["flops"] == pytest.approx(20 * (step[1]["flops"] + step[2]["flops"]))
    assert "cnn_small float32" in capsys.readouterr().out


def test_cost_analysis_of_the_sweep_programs():
    """--sweep-program compiles the sweep's own program: vmap over t makes the
    convolutions grouped (one group per t), map with several BatchNorm batches at once keeps
    them dense; the loops count once per iteration, and the note's estimate is the two terms."""
    cost = _load("cost_analysis")
    text = cost.main(["--model", "cnn_small", "--batch-size", "16", "--eval-batch", "32",
                      "--num-t", "3", "--sweep-images", "64", "--sweep-program", "vmap:1:16",
                      "--sweep-program", "map:2:64", "--sweep-program", "map:2:64:fold",
                      "--kernel-us", "2"])
    rows = [ln for ln in text.splitlines() if ln.startswith("| sweep program: ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == [
        "sweep program: vmap over t, BN 4 batches of 16, one at a time, eval batch 16 (3 t x "
        "(64 BN + 64 eval images))",
        "sweep program: map over t, BN 4 batches of 16, 2 at once in 2 steps, eval batch 64 (3 "
        "t x (64 BN + 64 eval images))",
        "sweep program: map over t, BN 4 batches of 16, 2 at once in 2 steps, eval batch 64, "
        "BN folded (3 t x (64 BN + 64 eval images))"]
    vmap_note, map_note, _ = (r.split("|")[8].strip() for r in rows)
    assert not vmap_note.startswith("0 of ") and map_note.startswith("0 of ")
    dense = ("map", 2, 64, False, False, False)
    row = cost.sweep_program_row("cnn_small", "float32", 16, dense, 3, 64, 2e-6, 1e12)
    assert row["note"].endswith(f"{row['bytes'] / 1e12 + row['kernels'] * 2e-6:.3g} s")
    twice = cost.sweep_program_row("cnn_small", "float32", 16, dense, 3, 128, 2e-6,
                                   1e12)  # twice the loop iterations of each pass
    assert 1.5 * row["bytes"] < twice["bytes"] < 2.5 * row["bytes"]
    assert twice["kernels"] > row["kernels"]
    # The label says what runs: 8 batches of 16 and a remainder, 3 at once padded to 9.
    odd = cost.sweep_program_row("cnn_small", "float32", 16, ("map", 3, 64, False, False, False),
                                 3, 140, 2e-6, 1e12)
    assert "BN 8 batches of 16 + 12, 3 at once in 3 steps" in odd["program"]
    assert cost.parse_sweep_program("map:16:2000:pointwise") == ("map", 16, 2000, False, True,
                                                                 False)
    assert cost.parse_sweep_program("vmap:1:500:fold") == ("vmap", 1, 500, True, False, False)
    assert cost.parse_sweep_program("map:1:5:pointwise:fold") == ("map", 1, 5, True, True, False)
    assert cost.parse_sweep_program("map:1:5:conv3x3:pointwise") == ("map", 1, 5, False, True,
                                                                     True)
    for bad in ("pmap:1:500", "vmap:0:500", "vmap:1", "map:x:5", "map:1:5:folded",
                "map:1:5:fold:x", "map:1:5:fold:fold", "map:1:5:conv3x3"):
        with pytest.raises(SystemExit):
            cost.main(["--model", "cnn_small", "--sweep-program", bad])


# A GPU program as XLA prints it (shortened): in the entry computation a cuDNN convolution,
# a fusion that reads it, a loop of three iterations and instructions that launch nothing.
GPU_HLO = """HloModule jit_f, is_scheduled=true

%fused_relu (param_0: f32[128,32,32,16]) -> f32[128,32,32,16] {
  ROOT %m = f32[128,32,32,16]{3,2,1,0} maximum(%param_0, %param_0)
}

%d (p: f32[10]) -> f32[10] {
  %p = f32[10]{0} parameter(0)
  ROOT %s = f32[10]{0} fusion(%p), kind=kLoop, calls=%fused_relu
}

%c (p: f32[10]) -> pred[] {
  %p = f32[10]{0} parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.2 (x.1: f32[128,32,32,16], w.1: f32[3,3,16,16]) -> (f32[128,32,32,16], f32[10]) {
  %x.1 = f32[128,32,32,16]{3,2,1,0} parameter(0), sharding={replicated}
  %w.1 = f32[3,3,16,16]{3,2,1,0} parameter(1)
  %b = f32[10]{0} bitcast(%w.1)
  %cv = (f32[128,32,32,16], u8[0]) custom-call(%x.1, %w.1), custom_call_target="__cudnn$convForward"
  %gte = f32[128,32,32,16]{3,2,1,0} get-tuple-element(%cv), index=0
  %relu = f32[128,32,32,16]{3,2,1,0} fusion(%gte), kind=kLoop, calls=%fused_relu
  %small = f32[10]{0} fusion(%b), kind=kLoop, calls=%fused_relu
  %w = f32[10] while(%small), condition=%c, body=%d, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %tuple = (f32[128,32,32,16]{3,2,1,0}, f32[10]{0}) tuple(%relu, %small)
}
"""


def test_hlo_kernels_counts_what_launches_and_its_bytes():
    cost = _load("cost_analysis")
    act, w = 128 * 32 * 32 * 16 * 4, 3 * 3 * 16 * 16 * 4
    assert cost.hlo_kernels(GPU_HLO) == [
        ("custom-call:__cudnn$convForward", act + act + w),  # output (and u8[0]), operands
        ("fusion:kLoop", 2 * act),
        ("fusion:kLoop", 40 + 40),
    ] + [("fusion:kLoop", 40 + 40)] * 3  # the loop's body, once per iteration
    assert cost._shape_bytes("(bf16[2,3]{1,0}, pred[4], u8[0]{0})") == 12 + 4
    with pytest.raises(ValueError, match="no ENTRY computation"):
        cost.hlo_kernels("HloModule m\n")
    # A fusion that reads a packed vector through a slice reads the slice, not the vector;
    # an operand it reads whole counts whole.
    sliced = """HloModule m

%fused (param_0: f32[1000], param_1: f32[10]) -> f32[10] {
  %param_0 = f32[1000]{0} parameter(0)
  %param_1 = f32[10]{0} parameter(1)
  %s = f32[10]{0} slice(%param_0), slice={[20:30]}
  ROOT %a = f32[10]{0} add(%s, %param_1)
}

ENTRY %main (v: f32[1000], b: f32[10]) -> f32[10] {
  %v = f32[1000]{0} parameter(0)
  %b = f32[10]{0} parameter(1)
  ROOT %f = f32[10]{0} fusion(%v, %b), kind=kLoop, calls=%fused
}
"""
    assert cost.hlo_kernels(sliced) == [("fusion:kLoop", 40 + 40 + 40)]
    whole = sliced.replace("  ROOT %a", "  %n = f32[1000]{0} negate(%param_0)\n  ROOT %a")
    assert cost.hlo_kernels(whole) == [("fusion:kLoop", 40 + 4000 + 40)]


def test_rows_without_flops_read_bytes_and_kernels_off_the_hlo():
    """A program without XLA's cost analysis (a deviceless GPU compilation) gets the bytes
    of its kernels and no FLOPs, in the table and in the shares."""
    cost = _load("cost_analysis")

    class Compiled:  # what jax's Compiled gives for such a program
        def as_text(self):
            return GPU_HLO

        def cost_analysis(self):
            return None

    row = {"program": "p", "per": "step", **cost._cost(Compiled())}
    kernels = cost.hlo_kernels(GPU_HLO)
    assert row["bytes"] == sum(b for _, b in kernels) and math.isnan(row["flops"])
    assert row["kernels"] == 6 and row["tiny"] == 4  # the four small fusions
    cells = [c.strip() for c in cost.table([row], 1e12, 1e12).splitlines()[2].split("|")]
    assert cells[3] == "-" and cells[5] == "-" and cells[7] == "6 (4)"
    half = {**row, "bytes": row["bytes"] / 2, "kernels": 4}
    assert cost._share(half, row, "the plain step's") == (
        "0.50 of the plain step's bytes, -2 kernels")


def test_cost_analysis_of_the_data_parallel_step(capsys):
    """--devices N: the step rows are the data-parallel step (sharding.data_parallel) on N
    devices, with its collectives in the note; too few devices are refused by name (a mesh
    of one device runs the same program here, as this process has one CPU device)."""
    from mcu_jax import sharding

    cost = _load("cost_analysis")
    rows = cost.analyse("cnn_small", 16, "float32", 32, mesh=sharding.make_mesh(1))
    assert rows[0]["collectives"] == ("1 devices, per device: 0 all-gathers, 0 all-reduces "
                                      "(counted as kernels)")
    assert "collectives" not in rows[1]  # the forward passes stay single-device programs
    table = cost.table(rows[:1], 1e12, 1e12)
    assert table.splitlines()[-1].endswith("| 1 devices, per device: 0 all-gathers, 0 "
                                           "all-reduces (counted as kernels) | - |")
    hlo = "%a = f32[8] all-gather-start(%x)\n%b = f32[] all-reduce(%y)\n%c = all-reduce-done(%b)"
    assert cost._collectives(hlo, 2).startswith("2 devices, per device: 1 all-gathers, "
                                                "1 all-reduces")
    with pytest.raises(SystemExit):
        cost.main(["--model", "cnn_small", "--devices", "3"])
    assert "num_devices=3 but only 1 cpu device" in capsys.readouterr().err


def test_cost_analysis_compiles_for_a_gpu_it_does_not_have():
    """--gpu-target: a deviceless compilation for the H100 target config (only where JAX's
    CUDA plugin is installed; the GPU compiler's kernels and bytes, no FLOPs)."""
    pytest.importorskip("jax_plugins.xla_cuda13", reason="JAX's CUDA 13 plugin is not "
                        "installed (pip install -e '.[cuda13]'); no GPU is needed")
    cost = _load("cost_analysis")
    text = cost.main(["--model", "cnn_small", "--batch-size", "16", "--eval-batch", "32",
                      "--num-t", "2", "--sweep-images", "10", "--gpu-target",
                      str(ROOT / "experiments" / "gpu_targets" / "h100.pbtxt")])
    assert "on NVIDIA H100 80GB HBM3, compiled without it from " in text
    step = [ln for ln in text.splitlines() if ln.startswith("| curve step (batch 16) |")][0]
    cells = [c.strip() for c in step.split("|")]
    assert cells[3] == "-" and float(cells[4]) > 0 and int(cells[7].split()[0]) > 0


def test_cost_analysis_of_a_masked_step(tmp_path, capsys):
    """--mask compiles the step with a saved mask too: training only the head needs no
    backward pass through the convolutions, so the step costs far less."""
    import jax

    from mcu_jax import masks, pytrees
    from mcu_jax.models import create, init_variables

    cost = _load("cost_analysis")
    params = init_variables(create("cnn_small", 10), jax.random.PRNGKey(0), (8, 8, 1))["params"]
    flat = pytrees.flatten(params)
    masks.save(pytrees.unflatten(params, {p: p.startswith("head/") for p in flat}),
               tmp_path / "mask.json")
    text = cost.main(["--model", "cnn_small", "--batch-size", "16", "--eval-batch", "32",
                      "--num-t", "2", "--sweep-images", "10", "--mask",
                      str(tmp_path / "mask.json")])
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[4].startswith("sweep (") and len(names) == 9
    share = 100 * sum(v.size for p, v in flat.items() if p.startswith("head/")) / sum(
        v.size for v in flat.values())
    assert names[7] == (f"curve step (batch 16, mask from {tmp_path / 'mask.json'}: "
                        f"{share:.1f}% of elements trained)")
    # The note gives the masked step's share of the unmasked step's FLOPs (no second compile).
    note = rows[7].split("|")[8].strip()
    assert " of its bytes, " in note and " of the unmasked step's FLOPs, " in note
    assert float(note.split(" of the unmasked")[0]) < 0.5
    # The same mask with the fused BatchNorm, against the unmasked fused step (cnn_small
    # has no fused 1x1 kernel: no row for it).
    assert names[8] == names[7][:-1] + ", fused BatchNorm)"
    note = rows[8].split("|")[8].strip()
    assert " of the unmasked fused step's FLOPs, " in note
    assert float(note.split(" of the unmasked")[0]) < 0.5
    capsys.readouterr()


def test_dtype_eval_evaluates_every_model_of_a_seed_folder(tmp_path, theta_o, theta_p, capsys):
    """experiments/dtype_eval.py: theta_o, the method folders beside it and each MCU run's
    model, each evaluated as experiment.evaluate_model does, in float32 and in the dtype."""
    import dataclasses

    import numpy as np

    from mcu_jax import checkpoint, experiment, problem

    dtype_eval = _load("dtype_eval")
    seed_dir = tmp_path / "seed_0"
    with pytest.raises(SystemExit, match="no finished theta_o"):
        dtype_eval.main([str(seed_dir)])
    config = problem.ProblemConfig()  # digits, cnn_small, seed 0: the fixtures' problem
    checkpoint.save_model(seed_dir / "theta_o", theta_o,
                          {"problem": dataclasses.asdict(config)})
    checkpoint.save_model(seed_dir / "neggrad", theta_p, {})
    checkpoint.save_model(seed_dir / "mcu_run" / "model", theta_p, {})
    (seed_dir / "not_a_model").mkdir()
    assert [n for n, _ in dtype_eval.model_folders(seed_dir)] == ["theta_o", "mcu_run",
                                                                 "neggrad"]
    assert dtype_eval.main([str(seed_dir), "--dtype", "float32", "--tolerance", "0"]) == 0
    assert "largest difference: 0.00 points, within" in capsys.readouterr().out
    out = tmp_path / "out.json"
    assert dtype_eval.main([str(seed_dir), "--json", str(out), "--tolerance", "10"]) == 0
    text = capsys.readouterr().out
    assert "| theta_o | " in text and "| neggrad | " in text and "largest difference" in text
    results = json.loads(out.read_text())
    want = experiment.evaluate_model(problem.build(config), theta_o, mia=True, seed=0)
    for metric in ("UA", "RA", "TA", "MIA"):
        np.testing.assert_allclose(results["theta_o"]["float32"][metric], want[metric])
    diffs = [abs(r["float32"][m] - r["bfloat16"][m]) for r in results.values()
             for m in ("UA", "RA", "TA", "MIA")]
    assert f"largest difference: {max(diffs):.2f} points" in text
    if max(diffs) > 0:  # over a tolerance below it: exit status 1
        assert dtype_eval.main([str(seed_dir), "--tolerance", str(max(diffs) / 2)]) == 1


def test_cost_analysis_of_the_fused_1x1_kernel(monkeypatch, tmp_path):
    """For PreResNet the step (also masked) and both forward passes are compiled again with
    the fused 1x1 kernel (models/pointwise.py; XLA's own ops on the CPU, the Pallas kernels
    for a GPU target) and compared with the default ones, and the step (also masked) with
    the 3x3 kernels too; ``:pointwise`` sweeps with it."""
    import jax

    from mcu_jax import masks, pytrees

    cost = _load("cost_analysis")
    # A PreResNet of 11 layers under a name of its own, registered for this test only.
    monkeypatch.setitem(models._REGISTRY, "preresnet11_cost_test",
                        functools.partial(models.PreResNet, depth=11))
    params = models.init_variables(models.create("preresnet11_cost_test", 10),
                                   jax.random.PRNGKey(0), (32, 32, 3))["params"]
    masks.save(pytrees.unflatten(params, {p: "stage3" in p or p.startswith("head/")
                                          for p in pytrees.flatten(params)}),
               tmp_path / "mask.json")
    text = cost.main(["--model", "preresnet11_cost_test", "--batch-size", "8", "--eval-batch",
                      "8", "--num-t", "2", "--sweep-images", "16", "--sweep-program",
                      "map:1:8:pointwise", "--mask", str(tmp_path / "mask.json")])
    rows = {r.split("|")[1].strip(): r.split("|")[8].strip()
            for r in text.splitlines() if r.startswith("| ")}
    assert "of the default step's FLOPs" in rows["curve step (batch 8, fused 1x1 kernel)"]
    assert "of the 1x1 kernel step's FLOPs" in rows[
        "curve step (batch 8, fused 1x1 and 3x3 kernels)"]
    masked = [name for name in rows if "mask from" in name and "fused 1x1 kernel" in name]
    assert len(masked) == 1 and "of the unmasked kernel step's FLOPs" in rows[masked[0]]
    masked = [name for name in rows if "mask from" in name and "3x3 kernels" in name]
    assert len(masked) == 1 and "of the unmasked 1x1 and 3x3 kernel step's" in rows[masked[0]]
    assert "of the default pass's FLOPs" in rows["train-mode forward (batch 8, fused 1x1 kernel)"]
    assert "of the default pass's FLOPs" in rows["eval-mode forward (batch 8, fused 1x1 kernel)"]
    assert any(name.startswith("sweep program: map over t") and "fused 1x1 kernel" in name
               for name in rows)


def test_check_pointwise_passes_on_the_interpreted_kernel(capsys, monkeypatch):
    """check_pointwise.py (gpu_check.sh's part pointwise_check) compares the kernel and its
    backward kernel with XLA's ops on PreResNet-110's 1x1 shapes, the 3x3 kernels on its
    stride-1 3x3 shapes, and a PreResNet with them with the default model (outputs and
    gradients), ``bn_input``'s kernels with their XLA twins, and the curve point's kernel
    with XLA's sums. Here on one conv1, one conv3 and one conv2 shape and one size of each
    ``bn_input`` kernel (the kernels' own tests cover the shapes; interpreted, each costs
    seconds)."""
    check = _load("check_pointwise")
    monkeypatch.setattr(check, "CONV1", ((64, 16),))
    monkeypatch.setattr(check, "CONV3", ((16, 64),))
    monkeypatch.setattr(check, "SHAPES", ((64, 16), (16, 64)))
    monkeypatch.setattr(check, "CONV2", ((8, 64),))
    monkeypatch.setattr(check, "BN_INPUT", ((6, 16, (3, 3, 16, 16)),))
    monkeypatch.setattr(check, "BN_COEFFICIENTS", ((12, 32),))
    monkeypatch.setattr(check, "CHAIN", ((16, 64, 32),))
    # the curve point of a depth-11 PreResNet (14 weight tensors) instead of PreResNet-110's
    monkeypatch.setitem(models._REGISTRY, "preresnet11_check_test",
                        functools.partial(models.PreResNet, depth=11))
    monkeypatch.setattr(check, "CURVE_MODEL", "preresnet11_check_test")
    assert check.main(["--rows", "40", "--batch", "2", "--depth", "11"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# fused 1x1 and 3x3 kernels (interpret; the model in float32) and "
                          "curve point kernel (interpret) on cpu")
    assert "3x3 kernel K=64 N=64, 2 x 8 x 8, bfloat16: relative difference" in out
    assert "3x3 kernel K=16 N=32, 5 x 7 x 7, float32: relative difference" in out
    assert "3x3 kernel K=16 N=32, 5 x 7 x 7, float32: backward kernel: relative" in out
    assert "conv3x3='interpret' against the default model: logits" in out
    assert "conv3x3='interpret' against the default model: gradient of the loss" in out
    assert "1280 rows, bfloat16, residual: relative difference" in out
    assert "curve point's 14 weight tensors, bfloat16: relative difference 0.00e+00" in out
    assert "BatchNorm derivative from 6 shares of K=16, weight gradient (3, 3, 16, 16)" in out
    assert "BatchNorm coefficients from 12 shares of K=32: relative difference" in out
    assert "chain kernel K=16 N=64 N2=32, 40 rows, bfloat16: relative difference" in out
    # 1: conv1's shapes with K = 4N; the 3x3 kernels: 2 a shape; the chain: 1 a shape;
    # bn_input's: 2; the model: 4 checks; the curve point: 2
    checks = 2 * (3 * len(check.SHAPES) + 1 + 1 + 2 * (len(check.CONV2) + 1) + 1) + 2 + 4 + 2
    assert f"{checks} of {checks} checks passed" in out
    with pytest.raises(SystemExit):
        check.main(["--rows", "0"])
    # gpu_check.sh checks the curve point's kernel alone before the parts that run it
    assert check.main(["--checks", "curve-point"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# curve point kernel (interpret) on cpu")
    assert "2 of 2 checks passed" in out


def test_kernel_registers_reads_ptx_and_ptxas(tmp_path, monkeypatch):
    """kernel_registers.py finds each Pallas kernel's PTX in an XLA dump and reads ptxas's
    register and spill report (a stand-in ptxas here)."""
    regs = _load("kernel_registers")
    (tmp_path / "module_1.ptx").write_text(".visible .entry bn_relu_matmul_backward(\n")
    (tmp_path / "module_2.ptx").write_text(".visible .entry other(\n")
    (tmp_path / "module_3.ptx").write_text(".visible .entry bn_relu_conv3x3(\n")
    (tmp_path / "module_4.ptx").write_text(".visible .entry bn_finish(\n")
    (tmp_path / "module_5.ptx").write_text(".visible .entry matmul_chain(\n")
    assert regs.kernel_ptx(tmp_path) == {"bn_relu_matmul_backward": tmp_path / "module_1.ptx",
                                         "bn_relu_conv3x3": tmp_path / "module_3.ptx",
                                         "bn_finish": tmp_path / "module_4.ptx",
                                         "matmul_chain": tmp_path / "module_5.ptx"}
    fake = tmp_path / "ptxas"
    fake.write_text("#!/bin/sh\necho 'ptxas info    : Used 200 registers, used 1 barriers' >&2\n"
                    "echo '    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads'"
                    " >&2\n")
    fake.chmod(0o755)
    assert regs.ptxas_report(str(fake), tmp_path / "module_1.ptx", "sm_90a") == (200, 12)
    monkeypatch.setenv("PTXAS", str(fake))
    assert regs.find_ptxas() == str(fake)


def test_kernel_registers_of_every_shape_for_the_h100():
    """Where JAX's CUDA plugin (and its ptxas) is installed, kernel_registers.py compiles
    both kernels of every PreResNet-110 1x1 shape, as its block uses it (conv1 or conv3),
    the 3x3 kernel of each stride-1 3x3 shape and the chain kernel of each pair of 1x1
    shapes it chains, for the H100 without it, and the block rules leave no kernel spilling
    more than a few bytes."""
    pytest.importorskip("jax_plugins.xla_cuda13", reason="JAX's CUDA 13 plugin is not "
                        "installed (pip install -e '.[cuda13]'); no GPU is needed")
    text = _load("kernel_registers").main(["--rows", "1024"])
    rows = [r.split("|") for r in text.splitlines() if r.startswith("| K=")]
    # conv1: 2 kernels for each of 6 shapes; conv3 and conv2: 4 (with bn_input's) for each
    # of 3; the chain: 1 for each of 5
    assert len(rows) == 2 * 6 + 4 * 3 + 4 * 3 + 5 and all(int(r[5]) <= 64 for r in rows)
