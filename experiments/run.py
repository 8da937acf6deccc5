"""Runs one experiment config: ``python experiments/run.py NAME [group.field=value ...]``.

NAME is a file in experiments/configs/ (without .py), or the path of any such ``.py`` file
(e.g. your own config that registers your own unlearning method), whose ``get_config()``
returns an ``ExperimentConfig`` (or an ``AblationConfig``, whose experiment fields are then under
``experiment.``); every field can be overridden, e.g. ``seeds=0,1,2 mcu.epochs=5``.
Groups a config leaves unset (``mcu``, a method's config) take the paper's values for the
problem's data set and scenario, and ``problem.`` overrides are applied first for that.
``--fields`` lists the overridable fields; ``--compile-cache DIR|off`` sets the persistent
compilation cache (``mcu_jax.compile_cache``). User errors end with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(name: str):
    path = Path(name) if name.endswith(".py") else CONFIGS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"unknown experiment {name!r}: no file {path}; known: "
                         f"{', '.join(known)} (or the path of a config file ending in .py)")
    if str(CONFIGS) not in sys.path:
        sys.path.insert(0, str(CONFIGS))  # configs share helpers such as _cifar10.py
    spec = importlib.util.spec_from_file_location(f"mcu_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} has no get_config() function")
    from mcu_jax import ablation, experiment

    cfg = module.get_config()
    if not isinstance(cfg, experiment.ExperimentConfig | ablation.AblationConfig):
        raise ValueError(f"get_config() of {path} returned a {type(cfg).__name__}; expected "
                         "an ExperimentConfig or an AblationConfig")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="experiment config in experiments/configs/, or a .py path")
    parser.add_argument("overrides", nargs="*", help="group.field=value")
    parser.add_argument("--fields", action="store_true", help="list overridable fields")
    from mcu_jax import compile_cache, config

    compile_cache.add_argument(parser)
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides

    try:
        cfg = apply_overrides(load_config(args.name), args.overrides)
        if args.fields:
            print("\n".join(config.field_names(paper_defaults(cfg))))
            return 0
        compile_cache.enable_from_args(args.compile_cache)
        run(cfg)
    except user_errors() as err:
        print(f"run {args.name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def apply_overrides(cfg, overrides: list[str]):
    """``cfg`` with ``group.field=value`` overrides; the ``problem.`` ones first, as the data
    set and scenario decide the paper's values an unset group (``mcu``, a method's config)
    is filled with before one of its fields is set."""
    from mcu_jax import config

    def of_problem(item: str) -> bool:
        return item.split("=", 1)[0].strip().split(".")[-2:-1] == ["problem"]

    cfg = config.override(cfg, [item for item in overrides if of_problem(item)])
    return config.override(cfg, [item for item in overrides if not of_problem(item)],
                           fill=paper_defaults)


def paper_defaults(cfg):
    """An ``ExperimentConfig`` or ``AblationConfig`` with its unset groups written out."""
    from mcu_jax import ablation, experiment

    if isinstance(cfg, ablation.AblationConfig):
        return ablation.with_paper_defaults(cfg)
    return experiment.paper_defaults(cfg)


def run(cfg) -> Path:
    """Runs (or resumes) an ``ExperimentConfig`` or ``AblationConfig``; returns its folder."""
    from mcu_jax import ablation, experiment

    if isinstance(cfg, ablation.AblationConfig):
        return ablation.run_ablation(cfg)
    return experiment.run_experiment(cfg)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that a bad request or bad data raise: reported in one line, exit code 2."""
    from mcu_jax import loop

    return (ValueError, FileNotFoundError, KeyError, loop.NonFiniteLossError)


if __name__ == "__main__":
    sys.exit(main())
