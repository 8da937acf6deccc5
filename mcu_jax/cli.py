"""Command line: train theta_o / RT, produce theta_p with a method, run MCU on a curve.

    mcu-jax train   --out runs/digits/theta_o [problem.dataset=digits train.epochs=30 ...]
    mcu-jax unlearn --theta-o runs/digits/theta_o --method neggrad --out runs/digits/neggrad
    mcu-jax mcu     --theta-o runs/digits/theta_o --theta-p runs/digits/neggrad
                    --out runs/digits/mcu [mcu.epochs=5 mask.k=0.1 selection.num_t=20 ...]
    mcu-jax mask    --theta-o runs/digits/theta_o --out mask.json [mask.k=0.1 mask.k_r=0.1]

Every config field can be overridden as ``group.field=value`` (``field=value`` for the
method config of ``unlearn``); ``mcu-jax CMD --fields`` lists them. theta_o's directory
records the problem (data set, model, split), so later commands rebuild exactly the same
split; every ``--out`` folder answers only the request that made it. ``--compile-cache
DIR|off`` sets the persistent compilation cache (``mcu_jax.compile_cache``). User errors end
with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from mcu_jax import (
    checkpoint,
    checks,
    compile_cache,
    config,
    loop,
    masks,
    mcu,
    methods,
    pipeline,
    problem,
    pytrees,
    runs,
    train,
)
from mcu_jax.mcu import MCUConfig

_DIGITS_TRAIN = train.TrainConfig(epochs=30, lr=0.05)


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    problem: problem.ProblemConfig = problem.ProblemConfig()
    train: train.TrainConfig = _DIGITS_TRAIN
    retrain: bool = False  # RT: train from scratch on D_r only
    key: int = 0

    def __post_init__(self):
        checks.flag("retrain", self.retrain)
        checks.seed("key", self.key)


def _load_theta_o(path: str) -> tuple[dict, dict, problem.ProblemConfig]:
    variables, meta = checkpoint.load_model(path)
    if "problem" not in meta or "refs" not in meta:
        raise ValueError(f"{path} was not written by 'mcu-jax train' (no problem/refs metadata)")
    return variables, meta, problem.ProblemConfig(**meta["problem"])


def _check_origin(path: str, meta: dict, theta_o: dict) -> None:
    """A theta_p written by ``mcu-jax unlearn`` records (a digest of) the theta_o it unlearned,
    whose own folder fixes the problem and split: MCU connects theta_p with that theta_o, so
    another one is refused (a theta_p from elsewhere records none and is taken as given)."""
    made_from = meta.get("theta_o")
    if made_from is not None and made_from != runs.tree_digest(theta_o):
        raise ValueError(f"{path} was unlearned from another theta_o (its variables differ "
                         "from --theta-o's): give the theta_o it was made from")


def cmd_train(args) -> dict:
    cfg = config.override(TrainCommand(), args.overrides)
    prob = problem.build(cfg.problem)
    pool = prob.split.retain if cfg.retrain else np.arange(prob.dataset.num_train)
    meta = {"problem": config.to_dict(cfg.problem), "retrain": cfg.retrain}
    variables, meta = train.train_model(
        prob.model, prob.train, pool, cfg.train, jax.random.PRNGKey(cfg.key),
        prob.input_shape, args.out, metadata=meta, desc="RT" if cfg.retrain else "theta_o",
        references=(prob.test, prob.split), pretrained=cfg.problem.pretrained,
    )
    return {"out": str(args.out), "refs": meta["refs"], "minutes": meta["minutes"]}


def cmd_unlearn(args) -> dict:
    checks.seed("key", args.key)
    theta_o, meta, pcfg = _load_theta_o(args.theta_o)
    # The paper's protocol for this data set (epochs, lr, NegTV alpha; CIFAR-10's by default),
    # checked with the overrides before the data set is loaded.
    base = methods.default_config(args.method, pcfg.scenario, methods.setting_of(pcfg.dataset))
    mcfg = config.override(base, args.overrides)
    prob = problem.build(pcfg)
    data = methods.MethodData(prob.train, prob.test, prob.split, prob.input_shape)
    result = methods.produce(
        args.method, prob.model, theta_o, data, mcfg, jax.random.PRNGKey(args.key), args.out
    )
    return {"out": str(args.out), "method": args.method, "minutes": result.minutes}


@dataclasses.dataclass(frozen=True)
class MCUCommand:
    mcu: MCUConfig = MCUConfig()  # cmd_mcu starts from mcu.paper_config for theta_o's problem
    mask: pipeline.MaskConfig = pipeline.MaskConfig()
    selection: pipeline.SelectionConfig = pipeline.SelectionConfig()
    key: int = 0

    def __post_init__(self):
        checks.seed("key", self.key)


def cmd_mcu(args) -> dict:
    theta_o, meta, pcfg = _load_theta_o(args.theta_o)
    theta_p, p_meta = checkpoint.load_model(args.theta_p)
    _check_origin(args.theta_p, p_meta, theta_o)
    # The paper's curve training for theta_o's problem (e.g. 5 epochs class-wise).
    base = mcu.paper_config(pcfg.scenario, methods.setting_of(pcfg.dataset))
    cfg = config.override(MCUCommand(mcu=base), args.overrides)
    prob = problem.build(pcfg)
    out = pipeline.run_mcu(
        prob.model, theta_o, theta_p, prob.train, prob.test, prob.split, meta["refs"],
        jax.random.PRNGKey(cfg.key), cfg.mcu, cfg.mask, cfg.selection, out_dir=args.out,
    )
    return {
        "out": str(args.out),
        "t_star": out.t_star,
        "region": out.region,
        "measured": out.measured,
        "measured_gap": out.measured_gap,
        "minutes": out.minutes,
    }


@dataclasses.dataclass(frozen=True)
class MaskCommand:
    mask: pipeline.MaskConfig = pipeline.MaskConfig()


def cmd_mask(args) -> dict:
    """The section-2.3 mask theta_o gets (as ``mcu`` computes it), without training a curve:
    to inspect which tensors it trains, or to time the masked step with it
    (``experiments/benchmark.py --mask FILE``)."""
    theta_o, _, pcfg = _load_theta_o(args.theta_o)
    cfg = config.override(MaskCommand(), args.overrides)
    prob = problem.build(pcfg)
    mask = pipeline.compute_mask(prob.model, theta_o, prob.train, prob.split, cfg.mask)
    masks.save(mask, args.out)
    return {
        "out": str(args.out),
        "summary": masks.mask_summary(mask, theta_o["params"]),
        "trained": [path for path, kept in pytrees.flatten(mask).items() if kept],
    }


# Each command's required options (checked in main, so that --fields needs none of them).
_REQUIRED = {"train": ("out",), "unlearn": ("theta_o", "method", "out"),
             "mcu": ("theta_o", "theta_p", "out"), "mask": ("theta_o", "out")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcu-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train theta_o (or RT with retrain=true)")
    p.add_argument("--out", type=Path)
    p = sub.add_parser("unlearn", help="produce theta_p with a pre-unlearning method")
    p.add_argument("--theta-o")
    p.add_argument("--method", default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--key", type=int, default=0)
    p = sub.add_parser("mcu", help="train the curve theta_o -> theta_p and pick t*")
    p.add_argument("--theta-o")
    p.add_argument("--theta-p")
    p.add_argument("--out", type=Path)
    p = sub.add_parser("mask", help="compute theta_o's parameter mask and save it as JSON")
    p.add_argument("--theta-o")
    p.add_argument("--out", type=Path)
    for p in sub.choices.values():
        compile_cache.add_argument(p)
        p.add_argument("--fields", action="store_true",
                       help="list the config fields this command's overrides can set")
        p.add_argument("overrides", nargs="*", help="config overrides: group.field=value")
    return parser


_COMMANDS = {"train": cmd_train, "unlearn": cmd_unlearn, "mcu": cmd_mcu, "mask": cmd_mask}


def _fields(command: str, method: str | None) -> list[str]:
    if command == "train":
        return config.field_names(TrainCommand())
    if command == "unlearn":
        return config.field_names(methods.default_config(method or "neggrad"))
    if command == "mask":
        return config.field_names(MaskCommand())
    return config.field_names(MCUCommand())


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` with options and overrides in any order, as ``run.py`` takes
    them (argparse's intermixed parsing does not support subcommands): the overrides that
    follow an option are added to the ones before it, in the order given. Anything else it
    does not know is an error, as with ``parse_args``."""
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = _parse_args(parser, argv)
    if args.fields:
        try:
            print("\n".join(_fields(args.command, getattr(args, "method", None))))
        except ValueError as err:
            print(f"mcu-jax {args.command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    missing = [name for name in _REQUIRED[args.command] if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.command}: the following arguments are required: "
                     + ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        compile_cache.enable_from_args(args.compile_cache)
        result = _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError, loop.NonFiniteLossError) as err:
        print(f"mcu-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
