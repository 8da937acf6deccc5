"""Evaluates the models of one seed of an experiment run in float32 and in another compute
dtype (bfloat16), to see what the dtype alone does to the table's metrics.

usage: python experiments/dtype_eval.py RUN/CONFIG/seed_N [--dtype bfloat16]
                                        [--data-dir DIR] [--tolerance 0.5] [--json FILE]

The same variables are evaluated twice (``experiment.evaluate_model``: UA, RA, TA, MIA, and
UA_test class-wise), once with the problem's model computing in float32 and once in
``--dtype``; no model is retrained, so the differences are the dtype's own and not the
run-to-run noise of training anew (a CPU-scale CIFAR-10 run rounded differently in float32
moved its retrained results by up to 7 points of MIA: docs/benchmarks.md). The models are
the seed folder's theta_o, every method folder beside it (RT, NegGrad+, ...) and every MCU
run's ``model`` (theta(t*)); the problem (data set, split, model) is theta_o's, read from its
metadata, with its data folder replaced by ``--data-dir`` when given. Prints a Markdown table
and the largest difference against ``--tolerance``; exits with 1 when it is over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mcu_jax import checkpoint, experiment, problem
from mcu_jax.models import create

METRICS = ("UA", "UA_test", "RA", "TA", "MIA")


def model_folders(seed_dir: Path) -> list[tuple[str, Path]]:
    """(name, folder) of the evaluable models of a seed folder: theta_o first, then the other
    finished models beside it and each MCU run's theta(t*) (``NAME/model``), by name."""
    if not checkpoint.model_exists(seed_dir / "theta_o"):
        raise SystemExit(f"{seed_dir} has no finished theta_o: not a seed folder of "
                         "experiments/run.py (RUN/CONFIG/seed_N)? A run made with "
                         "models_from keeps theta_o in that folder.")
    found = [("theta_o", seed_dir / "theta_o")]
    for d in sorted(p for p in seed_dir.iterdir() if p.is_dir() and p.name != "theta_o"):
        if checkpoint.model_exists(d / "model"):
            found.append((d.name, d / "model"))
        elif checkpoint.model_exists(d):
            found.append((d.name, d))
    return found


def evaluate(seed_dir: Path, dtype: str, data_dir: str | None = None) -> dict[str, dict]:
    """model name -> {"float32": metrics, dtype: metrics} (percent)."""
    folders = model_folders(seed_dir)
    _, meta = checkpoint.load_model(seed_dir / "theta_o")
    if "problem" not in meta:
        raise SystemExit(f"{seed_dir / 'theta_o'} has no problem in its metadata")
    config = problem.ProblemConfig(**meta["problem"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    prob = problem.build(dataclasses.replace(config, dtype="float32"))
    problems = {d: dataclasses.replace(prob, model=create(
        config.model, prob.dataset.num_classes, dtype=d, fused_bn=config.fused_bn))
        for d in dict.fromkeys(("float32", dtype))}
    out = {}
    for name, folder in folders:
        variables, _ = checkpoint.load_model(folder)
        out[name] = {d: {k: v for k, v in experiment.evaluate_model(
            prob, variables, mia=True, seed=config.seed).items() if k in METRICS}
            for d, prob in problems.items()}
    return out


def table(results: dict[str, dict], dtype: str) -> tuple[str, float]:
    """The Markdown table (float32 / dtype per metric) and the largest absolute difference."""
    metrics = [m for m in METRICS if any(m in r["float32"] for r in results.values())]
    lines = ["| model | " + " | ".join(f"{m} float32 / {dtype}" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    worst = 0.0
    for name, r in results.items():
        cells = []
        for m in metrics:
            a, b = r["float32"].get(m), r[dtype].get(m)
            if a is None or b is None:
                cells.append("-")
                continue
            worst = max(worst, abs(a - b))
            cells.append(f"{a:.2f} / {b:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), worst


def main(argv=None) -> int:
    """Prints the comparison; 0 when the largest difference is within the tolerance."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed_dir", type=Path, help="RUN/CONFIG/seed_N of experiments/run.py")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--data-dir", default=None, help="the data folder (default: the run's)")
    p.add_argument("--tolerance", type=float, default=0.5, help="points")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    results = evaluate(args.seed_dir, args.dtype, args.data_dir)
    text, worst = table(results, args.dtype)
    verdict = "within" if worst <= args.tolerance else "NOT within"
    print(f"# The models of {args.seed_dir} evaluated in float32 and {args.dtype}\n\n{text}\n\n"
          f"largest difference: {worst:.2f} points, {verdict} the tolerance of "
          f"{args.tolerance:g} points")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
