"""The targets and the ratios to the authors' release, from one run of gpu_check.sh.

usage: python experiments/gpu_summary.py OUT

Reads OUT/parts.jsonl (one line per finished benchmark part, as gpu_check.sh writes them) and
OUT/reference.json (reference_peer.py's JSON line) and prints a Markdown section: every
measured number the issue's targets name, whether it met its target, and mcu-jax's speed
over the release's on the same card in the same call. Parts that did not run are reported
as "not measured", never guessed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEP_TARGET_MS = 5.0
SWEEP_TARGET_S = 1.1
MASKED_TARGET = 0.5  # masked step / unmasked step
E2E_TARGET_S = 60.0
# The CIFAR-10 protocol's curve training: 10 epochs of (22,500 + 5,000) // 128 = 214 steps.
E2E_PROTOCOL_STEPS = 2140
# The workload: PreResNet-110 at batch 128 (targets are judged only on it).
WORKLOAD = {"model": "preresnet110", "batch_size": 128}


def load_parts(out: Path) -> dict[str, dict]:
    """part name -> {"step": row numbers, "sweep": [row numbers...], "e2e": ..., "meta": ...}."""
    parts = {}
    path = out / "parts.jsonl"
    if not path.exists():
        return parts
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        rows = {"step": None, "sweep": [], "e2e": None, "meta": record.get("meta", {}),
                "xla_flags": record.get("xla_flags", ""), "args": record.get("args", {})}
        for row in record.get("rows", []):
            if row["part"] == "curve step":
                rows["step"] = row["numbers"] | {"setting": row["setting"]}
            elif row["part"] == "sweep":
                rows["sweep"].append(row["numbers"] | {"setting": row["setting"]})
            elif row["part"] == "end-to-end":
                rows["e2e"] = row["numbers"] | {"setting": row["setting"]}
        parts[record["part"]] = rows
    return parts


def load_reference(out: Path) -> dict | None:
    path = out / "reference.json"
    if not path.exists():
        return None
    for line in reversed(path.read_text().strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _step_ms(parts, name):
    step = parts.get(name, {}).get("step")
    return None if step is None else step["step_ms"]


def _standard(parts, name) -> bool:
    """Did part ``name`` run the issue's workload (model and batch size; a dry run with
    other sizes is reported, not judged)?"""
    args = parts.get(name, {}).get("args", {})
    return all(args.get(k) == v for k, v in WORKLOAD.items())


def _judged(ok: bool | None, parts, *names) -> str:
    """The verdict of ``ok``, or why there is none."""
    if ok is not None and not all(_standard(parts, n) for n in names):
        return "not the issue's workload"
    return _verdict(ok)


def _sweep(parts, name):
    sweeps = parts.get(name, {}).get("sweep") or []
    return sweeps[0] if sweeps else None


def _e2e_ok(e2e: dict) -> bool | None:
    """The end-to-end target, judged only on the protocol's workload (None otherwise)."""
    if e2e.get("steps") != E2E_PROTOCOL_STEPS or "D_r 45,000" not in e2e.get("setting", ""):
        return None
    return e2e["total_s"] <= E2E_TARGET_S


def _e2e_verdict(parts, name) -> str:
    """Part ``name``'s end-to-end verdict: on the issue's model and the protocol's sizes."""
    ok = _e2e_ok(parts[name]["e2e"])
    return "not the protocol workload" if ok is None else _judged(ok, parts, name)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def _dense_label(parts: dict, name: str, dtype: str, group: int, eval_batch: int,
                 fold_bn: bool = False, pointwise: str = "conv", conv3x3: str = "conv") -> str:
    """The sweep settings of part ``name`` in words: those it ran with (its benchmark
    arguments), or where it did not run gpu_check.sh's (the other arguments)."""
    args = {"dtype": dtype, "strategy": "map", "bn_group": group, "eval_batch_size": eval_batch,
            "fold_bn": fold_bn, "pointwise": pointwise, "conv3x3": conv3x3,
            **parts.get(name, {}).get("args", {})}
    return (f"{args['dtype']}, {args['strategy']} over t, {args['bn_group']} BN batches at "
            f"once, eval batch {args['eval_batch_size']}"
            f"{', BN folded for evaluation' if args['fold_bn'] else ''}"
            f"{', fused 1x1 kernel' if args['pointwise'] == 'fused' else ''}"
            f"{', fused 3x3 kernel' if args['conv3x3'] == 'fused' else ''}")


def summary(out: Path) -> str:
    parts = load_parts(out)
    ref = load_reference(out)
    lines = ["## Targets (issue 7) and ratios to the authors' release", ""]
    device = next((p["meta"].get("device") for p in parts.values() if p["meta"]), "unknown")
    lines.append(f"- device: {device}; parts measured: {', '.join(parts) or 'none'}")
    if ref is not None:
        lines.append(f"- authors' release (same call): {ref['step_ms']} ms/step, sweep "
                     f"{ref['sweep_img_fwd_per_s']:,} img-fwd/s ({ref['sweep_t']} t in "
                     f"{ref['sweep_s']} s; {ref['device']}, torch {ref['torch']})")
        if str(ref["device"]).strip().lower() != str(device).strip().lower():
            lines.append(f"- no ratios: the release ran on {ref['device']!r}, mcu-jax on "
                         f"{device!r} (ratios need the same card)")
            ref = None
    else:
        lines.append("- authors' release: not measured in this call")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    # each step variant against the step it changes
    step_base = {"fused": ("f32", "unfused float32 step"),
                 "pointwise_step": ("f32", "float32 step with nn.Conv"),
                 "pointwise_step_bf16": ("bf16", "bfloat16 step with nn.Conv"),
                 "conv3x3_step": ("pointwise_step", "fused 1x1 kernel's step with cuDNN's 3x3 "
                                  "convolutions"),
                 "conv3x3_step_bf16": ("pointwise_step_bf16", "bfloat16 fused 1x1 kernel's "
                                       "step with cuDNN's 3x3 convolutions"),
                 "combine_xla": ("pointwise_step", "fused 1x1 kernel's step with the curve "
                                 "point's kernel")}
    for name, label in (("f32", "float32"), ("fused", "float32, fused BatchNorm"),
                        ("pointwise_step", "float32, fused 1x1 kernel"),
                        ("bf16", "bfloat16"),
                        ("pointwise_step_bf16", "bfloat16, fused 1x1 kernel"),
                        ("conv3x3_step", "float32, fused 1x1 and 3x3 kernels"),
                        ("conv3x3_step_bf16", "bfloat16, fused 1x1 and 3x3 kernels"),
                        ("combine_xla", "float32, fused 1x1 kernel, the curve point by "
                                        "XLA's sums"),
                        ("cmdbuf", "float32, command buffers")):
        ms = _step_ms(parts, name)
        text = "-" if ms is None else f"{ms:.2f} ms"
        if ms is not None and ref is not None:
            text += f" ({ref['step_ms'] / ms:.1f}x the release's float32)"
        before = _step_ms(parts, step_base[name][0]) if name in step_base else None
        if ms is not None and before is not None:
            text += f"; {ms / before:.2f} of the {step_base[name][1]}"
        lines.append(f"| curve step <= {STEP_TARGET_MS:g} ms ({label}) | {text} | "
                     f"{_judged(None if ms is None else ms <= STEP_TARGET_MS, parts, name)} |")
    # each variant against the sweep it changes: sweep_map against f32's, fold and pointwise
    # against sweep_map's (gpu_check.sh runs them on the dense settings), conv3x3_bf16
    # against pointwise_bf16's, unfolded_bf16 against conv3x3_bf16's
    base = {"sweep_map": ("f32", "float32 sweep"), "fold": ("sweep_map", "unfolded sweep"),
            "pointwise": ("sweep_map", "sweep with nn.Conv"),
            "pointwise_bf16": ("bf16", "bfloat16 sweep"),
            "conv3x3_bf16": ("pointwise_bf16", "sweep with cuDNN's 3x3 convolutions"),
            "unfolded_bf16": ("conv3x3_bf16", "folded sweep (with the chain kernel)")}
    for name, label in (
            ("f32", "float32"),
            ("sweep_map", _dense_label(parts, "sweep_map", "float32", 16, 2000)),
            ("fold", _dense_label(parts, "fold", "float32", 16, 2000, fold_bn=True)),
            ("pointwise", _dense_label(parts, "pointwise", "float32", 16, 2000,
                                       pointwise="fused")),
            ("bf16", "bfloat16"),
            ("pointwise_bf16", _dense_label(parts, "pointwise_bf16", "bfloat16", 46, 6000,
                                            fold_bn=True, pointwise="fused")),
            ("conv3x3_bf16", _dense_label(parts, "conv3x3_bf16", "bfloat16", 46, 6000,
                                          fold_bn=True, pointwise="fused", conv3x3="fused")),
            ("unfolded_bf16", _dense_label(parts, "unfolded_bf16", "bfloat16", 46, 6000,
                                           pointwise="fused", conv3x3="fused"))):
        sw = _sweep(parts, name)
        text = "-"
        if sw is not None:
            text = f"{sw['sweep_s']:.3g} s, {sw['image_forwards_per_s']:,.0f} img-fwd/s"
            if ref is not None:
                text += (f" ({sw['image_forwards_per_s'] / ref['sweep_img_fwd_per_s']:.1f}x "
                         "the release's float32)")
            before = _sweep(parts, base[name][0]) if name in base else None
            if before is not None:
                text += f"; {sw['sweep_s'] / before['sweep_s']:.2f} of the {base[name][1]}"
        ok = None
        if sw is not None and sw["image_forwards"] == 240000:
            ok = sw["sweep_s"] <= SWEEP_TARGET_S
        lines.append(f"| 20-point sweep <= {SWEEP_TARGET_S:g} s ({label}) | {text} | "
                     f"{_judged(ok, parts, name)} |")
    for masked, plain, label in (("f32_k01", "f32", "float32"), ("bf16_k01", "bf16", "bfloat16"),
                                 ("f32_paper", "f32", "float32, paper mask k=0.5, k_r=0.1")):
        a, b = _step_ms(parts, masked), _step_ms(parts, plain)
        ok = None if a is None or b is None else a <= MASKED_TARGET * b
        text = "-" if ok is None else f"{a:.2f} / {b:.2f} ms = {a / b:.2f}"
        target = "masked step <= half the unmasked" if masked != "f32_paper" else "masked step"
        verdict = _judged(ok, parts, masked, plain) if masked != "f32_paper" else "(information)"
        lines.append(f"| {target} ({label}) | {text} | {verdict} |")
    for name, label in (("e2e", ""), ("e2e_warm", ", compilation cache warm"),
                        ("e2e_pre", ", sweep compiled in the background"),
                        ("e2e_fast", ", every speed option"),
                        ("e2e_fast_warm", ", every speed option, compilation cache warm")):
        e2e = parts.get(name, {}).get("e2e")
        if e2e is None:
            lines.append(f"| end-to-end MCU phase <= {E2E_TARGET_S:g} s{label} | - | "
                         "not measured |")
            continue
        ph = e2e["phases_s"]
        lines.append(f"| end-to-end MCU phase <= {E2E_TARGET_S:g} s{label} | "
                     f"{e2e['total_s']:.1f} s (mask {ph['mask']:.1f}, curve {ph['curve']:.1f}, "
                     f"selection {ph['selection']:.1f}; compilation included) | "
                     f"{_e2e_verdict(parts, name)} |")
    strategies = parts.get("strategies", {}).get("sweep") or []
    if strategies:
        lines += ["", "Sweep strategies (same work each):", ""]
        for sw in strategies:
            lines.append(f"- {sw['setting']}: {sw['sweep_s']:.3g} s "
                         f"(compile {sw['compile_s']:.1f} s)")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python experiments/gpu_summary.py OUT")
    out = Path(argv[0])
    if not out.is_dir():
        raise SystemExit(f"{out} is not a folder (gpu_check.sh's OUT)")
    print(summary(out))


if __name__ == "__main__":
    main()
