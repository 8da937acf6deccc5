"""Reproduces the paper's tables and figures with one command: ``python experiments/paper.py
[SUITE] [group.field=value ...] [--data-dir DIR] [--out-dir DIR] [--only NAME,NAME]
[--compile-cache DIR|off]``.

SUITE names the settings run, one experiment config each, in order:

- ``digits`` (default): every table and figure at the scale of the embedded digits set, on a
  CPU (about 8.5 minutes on 2 cores).
- ``cifar10``: the paper's CIFAR-10 / PreResNet-110 settings: Tables 1 and 3, the CIFAR-10
  rows of Table 2, Figures 2-9 (GPU; ``--data-dir`` holds CIFAR-10).
- ``all``: ``cifar10`` and Table 2's Tiny-ImageNet and ImageNet-100 rows (the latter
  fine-tunes a pretrained ViT-B/16: ``--pretrained VIT.npz``, or the suite is refused before
  anything runs).

Every run resumes where it stopped, so the command can simply be repeated after a failure.
Compiled programs are kept in the persistent compilation cache (``mcu_jax.compile_cache``, as
``run.py``), so the configs of a suite, and a repeated command, compile each program once.
``field=value`` overrides go to every config (to its ``experiment`` in an ablation, e.g.
``seeds=0``). The results are gathered in ``OUT/paper_SUITE.md``: each table and figure
under the paper's number, with links to the run folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import run as run_script

# Each suite: (the paper items a config reproduces, the config), in the order they run.
_RANDOM = ("Tables 1-2 (random forgetting) and Figure 3a", "_random")
_CLASS = ("Table 3 (class-wise forgetting) and Figure 3b", "_class")
_ABLATIONS = (
    ("Figure 2 (the parameter mask: time per epoch, random mask)", "mask"),
    ("Figure 4 (beta)", "beta"),
    ("Figure 5 (k)", "k"),
    ("Figure 6 (k_r)", "k_r"),
    ("Figure 7 (under- and over-forgetting theta_p)", "forgetting"),
    ("Figures 8-9 (share of D_r in curve training)", "retain_share"),
)


def _ablations(prefix: str) -> list[tuple[str, str]]:
    return [(item, f"{prefix}_{kind}") for item, kind in _ABLATIONS]


def _suite(prefix: str, ablation_prefix: str) -> list[tuple[str, str]]:
    return [(item, prefix + tail) for item, tail in (_RANDOM, _CLASS)] + _ablations(
        ablation_prefix)


SUITES: dict[str, list[tuple[str, str]]] = {
    # digits_random (the main job) and digits_class have NegGrad+ only; digits_methods and
    # digits_methods_class add the other five methods on their models.
    "digits": [("Table 1 (NegGrad+ rows) and Figure 3a", "digits_random"),
               ("Tables 1-2 (all six methods, with MCU and MCU_beta)", "digits_methods"),
               ("Table 3 (NegGrad+ rows) and Figure 3b", "digits_class"),
               ("Table 3 (all six methods, with MCU and MCU_beta)", "digits_methods_class"),
               *_ablations("digits_ablation")],
    "cifar10": _suite("cifar10_preresnet110", "cifar10_preresnet110_ablation"),
}
SUITES["all"] = SUITES["cifar10"] + [
    ("Table 2 (Tiny-ImageNet row)", "tinyimagenet_vgg16bn_random"),
    ("Table 2 (ImageNet-100 row)", "imagenet100_vit_random"),
]


def overrides_for(cfg, overrides: list[str], data_dir: str | None, out_dir: str | None,
                  pretrained: str | None = None):
    """The command-line overrides for one config: an ablation's experiment fields get their
    ``experiment.`` prefix; ``pretrained`` goes to the configs that need pretrained weights
    (``problem.PRETRAINED_REQUIRED``) only."""
    from mcu_jax import ablation, problem

    given = [f"problem.data_dir={data_dir}"] if data_dir else []
    given += [f"out_dir={out_dir}"] if out_dir else []
    needs = getattr(cfg, "experiment", cfg).problem.pretrained == problem.PRETRAINED_REQUIRED
    given += [f"problem.pretrained={pretrained}"] if pretrained and needs else []
    given += overrides
    if not isinstance(cfg, ablation.AblationConfig):
        return given
    own = {f.name for f in dataclasses.fields(ablation.AblationConfig)}
    return [item if item.split("=", 1)[0].split(".", 1)[0] in own else f"experiment.{item}"
            for item in given]


def _demoted(markdown: str) -> str:
    """A run's results.md, its headings two levels lower (they sit under a paper item)."""
    return "\n".join("##" + line if line.startswith("#") else line
                     for line in markdown.splitlines())


def write_index(suite: str, entries: list[tuple[str, str, Path, str]], out_dir: Path,
                command: str) -> Path:
    """``out_dir/paper_SUITE.md``: every item's table (its run's results.md) and figures;
    items whose run has not finished are listed as such."""
    lines = [f"# The paper's tables and figures: suite `{suite}`", "",
             f"Command: `{command}`; one run folder per setting (each resumes when the command "
             "is repeated).", ""]
    for item, name, folder, rerun in entries:
        lines += [f"## {item}: `{name}`", ""]
        results = folder / "results.md"
        if not results.is_file():
            lines += [f"Not run yet (`{rerun}`).", ""]
            continue
        lines += [f"Run folder: `{_relative(folder, out_dir)}`", "",
                  _demoted(results.read_text()), ""]
        for png in sorted(folder.glob("*.png")) + sorted(folder.glob("curves/*.png")):
            lines += [f"![{png.stem}]({_relative(png, out_dir)})", ""]
    path = out_dir / f"paper_{suite}.md"
    path.write_text("\n".join(lines))
    return path


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Runs a suite of experiment configs and gathers the paper's tables and "
                    "figures in OUT/paper_SUITE.md.")
    parser.add_argument("words", nargs="*", metavar="[SUITE] [field=value ...]",
                        help=f"the suite ({', '.join(SUITES)}; default digits), then overrides "
                             "for every config")
    parser.add_argument("--data-dir", help="folder of the data sets (problem.data_dir)")
    parser.add_argument("--out-dir", help="parent of the run folders (default: runs)")
    parser.add_argument("--pretrained", metavar="FILE.npz",
                        help="initial weights for the settings that fine-tune pretrained ones "
                             "(ImageNet-100's ViT-B/16; problem.pretrained)")
    parser.add_argument("--only", metavar="NAME[,NAME...]",
                        help="run only these configs of the suite (the index shows them all)")
    from mcu_jax import compile_cache

    compile_cache.add_argument(parser)
    args = parser.parse_intermixed_args(argv)
    words = list(args.words)
    args.suite = words.pop(0) if words and "=" not in words[0] else "digits"
    if args.suite not in SUITES:
        parser.error(f"unknown suite {args.suite!r}; suites: {', '.join(SUITES)}")
    args.overrides = words
    args.only = [n for n in (args.only or "").split(",") if n]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from mcu_jax import compile_cache, experiment, problem, runs

    names = [name for _, name in SUITES[args.suite]]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        print(f"paper {args.suite}: error: --only {unknown} not in the suite; its configs: "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    configs = []  # every config checked with its overrides before anything runs
    for item, name in SUITES[args.suite]:
        try:
            cfg = run_script.load_config(name)
            cfg = run_script.apply_overrides(cfg, overrides_for(
                cfg, args.overrides, args.data_dir, args.out_dir, args.pretrained))
            if not args.only or name in args.only:
                problem.check_pretrained(getattr(cfg, "experiment", cfg).problem)
        except ValueError as err:
            print(f"paper {args.suite}: error in {name}: {err}", file=sys.stderr)
            return 2
        configs.append((item, name, cfg, getattr(cfg, "experiment", cfg)))
    try:
        compile_cache.enable_from_args(args.compile_cache)
    except ValueError as err:
        print(f"paper {args.suite}: error: {err}", file=sys.stderr)
        return 2
    entries = []
    for item, name, cfg, exp in configs:
        if not args.only or name in args.only:
            print(f"=== {item}: {name} ===", flush=True)
            try:
                run_script.run(cfg)
            except run_script.user_errors() as err:
                hint = ("" if isinstance(err, runs.RequestMismatch) else
                        " (the finished runs are kept: repeat the command to resume)")
                print(f"paper {args.suite}: error in {name}: {err}{hint}", file=sys.stderr)
                return 2
        entries.append((item, name, Path(exp.out_dir) / exp.name,
                        experiment.rerun_command(exp)))
    out_dir = Path(configs[0][3].out_dir)
    command = " ".join(["python experiments/paper.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"tables and figures: {write_index(args.suite, entries, out_dir, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
