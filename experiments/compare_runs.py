"""Compares the accuracies of two experiment runs (e.g. float32 against bfloat16).

usage: python experiments/compare_runs.py A/results.json B/results.json [--tolerance 0.5]

Reads the ``rows`` of two ``results.json`` files written by ``experiments/run.py`` and prints,
for every row present in both and every accuracy metric (UA, RA, TA, MIA, and UA_test where
present; means over seeds, in percent), the two values and their absolute difference, then
the largest difference and whether it stays within ``--tolerance`` points. Rows or metrics
found in only one file are listed, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("UA", "UA_test", "RA", "TA", "MIA")


def load_rows(path: Path) -> dict[str, dict]:
    """method name -> row (metric -> {"mean", "std", "values"})."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist (a results.json of experiments/run.py?)")
    rows = json.loads(path.read_text()).get("rows")
    if not isinstance(rows, list):
        raise SystemExit(f"{path} has no 'rows' list: not a results.json of experiments/run.py")
    return {row["method"]: row for row in rows}


def compare(a: dict[str, dict], b: dict[str, dict], tolerance: float,
            names: tuple[str, str] = ("A", "B")) -> tuple[str, float | None]:
    """The Markdown comparison and the largest absolute difference (None if nothing shared)."""
    lines = [f"| row | metric | {names[0]} | {names[1]} | abs. difference |",
             "|---|---|---|---|---|"]
    worst = None
    one_sided = []
    for method in [m for m in a if m in b]:
        for metric in METRICS:
            if (metric in a[method]) != (metric in b[method]):
                one_sided.append(f"{method} {metric}")
            if metric not in a[method] or metric not in b[method]:
                continue
            va, vb = a[method][metric]["mean"], b[method][metric]["mean"]
            diff = abs(va - vb)
            worst = diff if worst is None else max(worst, diff)
            flag = "" if diff <= tolerance else " **over**"
            lines.append(f"| {method} | {metric} | {va:.2f} | {vb:.2f} | {diff:.2f}{flag} |")
    only = sorted(set(a) ^ set(b))
    if only:
        lines += ["", f"rows in only one run: {', '.join(only)}"]
    if one_sided:
        lines += ["", f"metrics in only one run: {', '.join(one_sided)}"]
    if worst is None:
        lines += ["", "no metric in common"]
    else:
        verdict = "within" if worst <= tolerance else "NOT within"
        lines += ["", f"largest difference: {worst:.2f} points, {verdict} the tolerance of "
                      f"{tolerance:g} points"]
    return "\n".join(lines), worst


def _label(path: Path) -> str:
    """results_float32.json -> results_float32; run_a/results.json -> run_a."""
    return path.parent.name if path.stem == "results" and path.parent.name else path.stem


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.5, help="points")
    args = p.parse_args(argv)
    if args.tolerance < 0:
        raise SystemExit(f"--tolerance must be >= 0, got {args.tolerance}")
    labels = (_label(args.a), _label(args.b))
    if labels[0] == labels[1]:  # e.g. two run folders of the same experiment name
        labels = (f"{args.a.parent.parent.name}/{labels[0]}",
                  f"{args.b.parent.parent.name}/{labels[1]}")
    text, _ = compare(load_rows(args.a), load_rows(args.b), args.tolerance, labels)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
