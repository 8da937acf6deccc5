"""The experiment runner: the paper's tables and figures from one config.

For every seed: train (or load) theta_o and RT, produce each configured pre-unlearning
model theta_p, run MCU (fixed beta) and/or MCU_beta (adaptive) on top of each, evaluate
every model the same way (UA, RA, TA, MIA, UA_test, Avg. Gap to RT, RTE), and draw the
curve figure of every MCU run. Results over seeds go to ``results.json`` and to
``results.md`` in the paper's table format. Every phase is recorded in the run folder, so
running the same command again reuses what is finished.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from mcu_jax import (
    checkpoint,
    checks,
    config,
    evaluation,
    masks,
    methods,
    metrics,
    pipeline,
    plots,
    problem,
    runs,
    sharding,
)
from mcu_jax import train as train_lib
from mcu_jax.mcu import MCUConfig, steady_epoch_seconds
from mcu_jax.mcu import paper_config as paper_mcu_config
from mcu_jax.methods import MethodConfig, default_config
from mcu_jax.runs import RunDir

DISPLAY = {
    "rt": "RT", "ft": "FT", "rl": "RL", "ga": "GA", "neggrad": "NegGrad+", "salun": "SalUn",
    "negtv": "NegTV",
}
MCU_MODES = {"fixed": "MCU", "adaptive": "MCU_beta"}
TABLE1_METHODS = ("ft", "rl", "ga", "neggrad", "salun", "negtv")
# The paper's beta values (Figure 4), searched for its MCU (fixed beta) rows (fixed_betas).
PAPER_BETAS = (0.1, 0.2, 0.3, 0.5)


@dataclasses.dataclass(frozen=True)
class MethodsConfig:
    """Hyperparameters of each pre-unlearning method. None (the default) is the paper's for
    the experiment's data set and scenario (``methods.default_config``), and so is NegTV's
    alpha None; :func:`paper_defaults` writes them out."""

    ft: MethodConfig | None = None
    rl: MethodConfig | None = None
    ga: MethodConfig | None = None
    neggrad: MethodConfig | None = None
    salun: MethodConfig | None = None
    negtv: MethodConfig | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "digits_random"
    command: str = ""  # how to rerun it, for results.md ("": experiments/run.py NAME)
    problem: problem.ProblemConfig = problem.ProblemConfig()
    seeds: tuple[int, ...] = (0,)
    original: train_lib.TrainConfig = train_lib.TrainConfig()  # theta_o on D_train
    retrain: train_lib.TrainConfig = train_lib.TrainConfig()  # RT on D_r
    methods: tuple[str, ...] = ("neggrad",)  # base methods giving theta_p
    method_configs: MethodsConfig = MethodsConfig()
    mcu_modes: tuple[str, ...] = ("adaptive",)  # "fixed" -> MCU, "adaptive" -> MCU_beta
    mcu: MCUConfig | None = None  # None: the paper's for the problem (mcu.paper_config)
    mask: pipeline.MaskConfig = pipeline.MaskConfig()
    selection: pipeline.SelectionConfig = pipeline.SelectionConfig()
    mia: bool = True
    table1: bool = False  # also write the paper's Table 1 layout
    out_dir: str = "runs"
    progress: bool = True
    devices: int | None = None  # >1: a mesh (data-parallel training, gradients, evaluation;
    # t-parallel sweeps); batch sizes (and mask / SalUn gradient ones) divisible by it
    # A run folder (under out_dir, e.g. the experiment an ablation extends) whose theta_o, RT
    # and base-method models this run reuses, and makes there when missing; a model there
    # made by another request is not touched: this run makes its own in its seed folder.
    # Runs sharing it may run at the same time: a model being made there is waited for.
    models_from: str | None = None
    # The MCU (fixed beta) rows, when mcu_modes has "fixed": () trains one curve at mcu.beta.
    # Several values train one curve each (same key) and the row is the value whose Avg. Gap
    # to RT over the seeds is smallest, the paper's "best results through beta search" (an
    # oracle choice: it needs RT, which adaptive beta does without); every value's row is in
    # results.md / results.json.
    fixed_betas: tuple[float, ...] = ()

    def __post_init__(self):
        _check_folder_name("name", self.name)
        if self.models_from is not None:
            _check_folder_name("models_from", self.models_from)
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"out_dir must name a folder (a non-empty string), got "
                             f"{self.out_dir!r}")
        if not isinstance(self.command, str):
            raise ValueError(f"command must be a string, got {self.command!r}")
        for name in ("mia", "table1", "progress"):
            checks.flag(name, getattr(self, name))
        # None (the default) and 1 both run on one device, without a mesh.
        checks.optional_integer("devices (None: one device)", self.devices, 1)
        if isinstance(self.seeds, str) or not isinstance(self.seeds, Sequence):
            raise ValueError(f"seeds must be a tuple of ints, got {self.seeds!r}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        seeds = tuple(checks.seed("seeds: each seed", s) for s in self.seeds)
        object.__setattr__(self, "seeds", seeds)  # plain ints: the run records them as JSON
        for mode in self.mcu_modes:
            if mode not in MCU_MODES:
                raise ValueError(f"mcu_modes: unknown mode {mode!r}; known: {tuple(MCU_MODES)}")
        _check_once("seeds", self.seeds, "seed", " (a repeated seed would count twice in the "
                    "mean and std)")
        for name in self.methods:
            check_base_method(name, "methods")
        _check_once("methods", self.methods, "method")
        _check_once("mcu_modes", self.mcu_modes, "mode")
        for beta in self.fixed_betas:
            checks.number("fixed_betas: each beta", beta, low=0)
        # Values are named (rows, folders) as {beta:g}: two values of one name would clash.
        _check_once("fixed_betas", self.fixed_betas, "value (to 6 significant digits)",
                    names=[f"{b:g}" for b in self.fixed_betas])


def _check_folder_name(field: str, value) -> None:
    """ValueError unless ``value`` is one plain folder name (no separator, not "." or ".."):
    the run folder is ``out_dir/value``, which a path would leave."""
    plain = (isinstance(value, str) and value.strip() == value and value not in ("", ".", "..")
             and "/" not in value and "\\" not in value and "\0" not in value)
    if not plain:
        raise ValueError(f"{field} must be a single folder name (no '/', '.' or '..'), got "
                         f"{value!r}")


def _check_once(field: str, values, what: str, why: str = "", names=None) -> None:
    """ValueError naming ``field`` when two of ``values`` are equal (or share a name of
    ``names``, one per value)."""
    names = list(values if names is None else names)
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: got {tuple(values)!r}; each {what} may appear once{why}")


def rerun_command(cfg: ExperimentConfig) -> str:
    """The command that reruns ``cfg`` (its ``command``, else ``experiments/run.py NAME``)."""
    return cfg.command or f"python experiments/run.py {cfg.name}"


def check_base_method(name: str, field: str) -> None:
    """ValueError unless ``name`` is a registered method that can give theta_p (not RT)."""
    if name == "rt":
        raise ValueError(f"{field}: 'rt' is not a pre-unlearning method here; the RT row of "
                         "every table comes from the `retrain` schedule")
    known = [m for m in methods.available() if m != "rt"]
    if name not in known:
        raise ValueError(f"{field}: unknown method {name!r}; known: {', '.join(known)}")


def method_config(cfg: ExperimentConfig, name: str) -> MethodConfig:
    """``name``'s config in ``cfg`` with everything the scenario decides filled in (NegTV's
    alpha None -> ``methods.negtv_alpha`` of the problem's scenario and data set)."""
    scenario, dataset = cfg.problem.scenario, cfg.problem.dataset
    base = (getattr(cfg.method_configs, name, None)
            or default_config(name, scenario, methods.setting_of(dataset)))
    if name == "negtv" and base.alpha is None:
        base = dataclasses.replace(base, alpha=methods.negtv_alpha(scenario, dataset))
    return dataclasses.replace(base, progress=cfg.progress)


def mcu_config(cfg: ExperimentConfig) -> MCUConfig:
    """``cfg.mcu``, or when None the paper's curve training for the problem's scenario and
    data set (``mcu.paper_config``: e.g. 5 epochs class-wise on CIFAR-10)."""
    scenario, dataset = cfg.problem.scenario, cfg.problem.dataset
    return cfg.mcu or paper_mcu_config(scenario, methods.setting_of(dataset))


def paper_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its unset (None) groups written out: ``mcu`` and every registered
    method's config, the paper's values for the problem (NegTV's alpha stays None, resolved
    by :func:`method_config`). Runs record and report this form; the command line fills
    these groups so that their fields can be overridden. The values are the problem's at
    this call: a later change of ``problem`` leaves them as they are."""
    scenario, setting = cfg.problem.scenario, methods.setting_of(cfg.problem.dataset)
    known = methods.available()
    unset = {
        f.name: default_config(f.name, scenario, setting,
                               **({"alpha": None} if f.name == "negtv" else {}))
        for f in dataclasses.fields(cfg.method_configs)
        if getattr(cfg.method_configs, f.name) is None and f.name in known
    }
    return dataclasses.replace(
        cfg, mcu=mcu_config(cfg),
        method_configs=dataclasses.replace(cfg.method_configs, **unset),
    )


def row_name(method: str, mode: str | None = None) -> str:
    """``NegGrad+`` for a base method, ``MCU_beta-NegGrad+`` for MCU on top of it."""
    base = DISPLAY.get(method, method)
    return base if mode is None else f"{MCU_MODES[mode]}-{base}"


def evaluate_model(prob: problem.Problem, variables: dict, mia: bool, seed: int,
                   mesh=None) -> dict:
    """UA, RA, TA (UA_test) and MIA-efficacy of one model, without augmentation.

    ``acc`` keeps the raw accuracies per set (D_f, D_r, D_t, and D_tf, D_tr class-wise).
    With a ``mesh`` (the seed's, :class:`SeedContext`) the evaluation is data parallel
    (``evaluation.outputs(..., mesh=)``).
    """
    sets = pipeline.eval_sets(prob.train, prob.test, prob.split)
    outs = evaluation.set_outputs(prob.model, variables, sets, mesh=mesh)
    acc = {name: evaluation.percent(o["correct"]) for name, o in outs.items()}
    return scored_metrics(acc, {name: o["prob"] for name, o in outs.items()}, mia, seed)


def scored_metrics(acc: dict[str, float], probs: dict, mia: bool, seed: int) -> dict:
    """The row of :func:`evaluate_model` from a model's accuracies (percent) and true-class
    probabilities on the sets of ``pipeline.eval_sets``."""
    # Class-wise, TA is the accuracy on the retained classes of D_t (D_tr), as the paper's
    # class-wise tables show (RT's TA there exceeds what a model blind to one class can
    # score on all of D_t); UA_test covers the forgotten class.
    scored = {**acc, "test": acc["test_retain"]} if "test_retain" in acc else acc
    result = metrics.unlearning_metrics(scored)
    if mia:
        # The MIA's non-members are the test images of the retained classes class-wise (D_tr,
        # as SalUn's protocol removes the forgotten class from the test set; TA's set too).
        non_members = probs["test_retain"] if "test_retain" in probs else probs["test"]
        result["MIA"] = metrics.mia_efficacy(
            probs["retain"], non_members, probs["forget"], seed=seed
        )
    result["acc"] = dict(acc)
    return result


def model_folder(cfg: ExperimentConfig, seed_dir: Path, seed: int, name: str, make):
    """``make(folder)`` for model ``name`` of a seed: in ``seed_dir`` when the run has begun
    it there; else in ``cfg.models_from``'s seed folder when that is free or holds this very
    request; else in ``seed_dir``."""
    own = seed_dir / name
    if cfg.models_from and not own.exists():
        shared = Path(cfg.out_dir) / cfg.models_from / f"seed_{seed}" / name
        try:
            return make(shared)
        except runs.RequestMismatch as err:
            print(f"{name} (seed {seed}): not reusing {shared}: {err}")
    return make(own)


def _train_phase(name: str, cfg: ExperimentConfig, prob, pool, tcfg, key, seed_dir, meta,
                 mesh, references=None) -> tuple:
    """theta_o or RT, trained once and then loaded from its folder (``model_folder``)."""
    tcfg = dataclasses.replace(tcfg, progress=meta.pop("progress"))
    return model_folder(cfg, seed_dir, meta["seed"], name, lambda folder: train_lib.train_model(
        prob.model, prob.train, pool, tcfg, key, prob.input_shape, folder,
        metadata=meta, desc=f"{name} (seed {meta['seed']})", pretrained=prob.config.pretrained,
        mesh=mesh, references=references,
    ))


@dataclasses.dataclass
class SeedContext:
    """What every row of one seed shares: the problem, theta_o and its references, RT."""

    cfg: ExperimentConfig
    run: RunDir
    seed: int
    prob: problem.Problem
    theta_o: dict
    refs: dict
    rt: dict  # RT's evaluated metrics (with raw accuracies under "acc")
    seed_dir: Path
    method_key: jax.Array
    curve_key: jax.Array
    mesh: object = None


def prepare_seed(cfg: ExperimentConfig, run: RunDir, seed: int) -> SeedContext:
    """Builds the seed's problem and trains (or loads) theta_o and RT."""
    prob = problem.build(dataclasses.replace(cfg.problem, seed=seed))
    seed_dir = run.path(f"seed_{seed}")
    k_o, k_rt, k_m, k_c = jax.random.split(jax.random.PRNGKey(seed), 4)
    mesh = sharding.make_mesh(cfg.devices) if cfg.devices and cfg.devices > 1 else None
    theta_o, meta_o = _train_phase(
        "theta_o", cfg, prob, np.arange(prob.dataset.num_train), cfg.original, k_o, seed_dir,
        {"seed": seed, "problem": config.to_dict(prob.config), "progress": cfg.progress}, mesh,
        references=(prob.test, prob.split),
    )
    rt_vars, meta_rt = _train_phase(
        "rt", cfg, prob, prob.split.retain, cfg.retrain, k_rt, seed_dir,
        {"seed": seed, "progress": cfg.progress}, mesh,
    )
    rt = _evaluated(run, f"eval_RT_{seed}", prob, rt_vars, cfg, seed,
                    {"rte_min": meta_rt["minutes"]}, mesh)
    return SeedContext(cfg, run, seed, prob, theta_o, meta_o["refs"], rt, seed_dir, k_m, k_c,
                       mesh)


def name_key(key: jax.Array, name: str) -> jax.Array:
    """``key`` folded with a stable number of ``name`` (CRC-32): a method's keys do not
    depend on its position in ``methods``, so adding, removing or reordering methods leaves
    the others' results (and their saved models) as they were."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def base_model(ctx: SeedContext, name: str, mcfg: MethodConfig | None = None,
               out_name: str | None = None):
    """theta_p from method ``name`` (produced once, then reused from its folder:
    ``model_folder``; ``out_name`` names a folder of this run's own instead)."""
    data = methods.MethodData(ctx.prob.train, ctx.prob.test, ctx.prob.split,
                              ctx.prob.input_shape, mesh=ctx.mesh)
    mcfg = dataclasses.replace(mcfg or method_config(ctx.cfg, name), progress=ctx.cfg.progress)
    def make(folder: Path):
        return methods.produce(name, ctx.prob.model, ctx.theta_o, data, mcfg,
                               name_key(ctx.method_key, name), folder)

    if out_name is not None:  # a variant of this run's own (e.g. other epochs): never shared
        return make(ctx.seed_dir / out_name)
    return model_folder(ctx.cfg, ctx.seed_dir, ctx.seed, name, make)


def run_seed(cfg: ExperimentConfig, run: RunDir, seed: int) -> dict[str, dict]:
    """All models of one seed, evaluated: ``{row name: metrics}``."""
    ctx = prepare_seed(cfg, run, seed)
    rows: dict[str, dict] = {"RT": ctx.rt}
    for name in cfg.methods:
        base = base_model(ctx, name)
        rows[row_name(name)] = _evaluated(
            run, f"eval_{name}_{seed}", ctx.prob, base.variables, cfg, seed,
            {"rte_min": base.minutes}, ctx.mesh,
        )
        for mode in cfg.mcu_modes:
            for label, mcu_cfg, out_name, figures in _mcu_variants(cfg, name, mode):
                rows[label] = mcu_row(ctx, base, mcu_cfg, cfg.mask, cfg.selection,
                                      name_key(ctx.curve_key, name), label, out_name, figures)
    for row in rows.values():
        row["avg_gap"] = metrics.avg_gap(row, rows["RT"])
    return rows


def beta_row_name(mcu_label: str, beta: float) -> str:
    """``MCU-NegGrad+ beta=0.2``: the row of one value of MCU row ``mcu_label``'s beta
    search."""
    return f"{mcu_label} beta={beta:g}"


BETA_SEARCH_FIGURES = "curves/beta_search"  # every value's curve; the chosen one's in curves/


def _mcu_variants(cfg: ExperimentConfig, method: str, mode: str):
    """(row label, MCUConfig, folder name, figure folder) of each curve of ``mode`` on top of
    ``method``: one, or one per value of ``cfg.fixed_betas`` for MCU (fixed beta)."""
    label, base = row_name(method, mode), mcu_config(cfg)
    if mode != "fixed" or not cfg.fixed_betas:
        yield (label, dataclasses.replace(base, beta_mode=mode), f"mcu_{mode}_{_slug(label)}",
               "curves")
        return
    for beta in cfg.fixed_betas:
        yield (beta_row_name(label, beta),
               dataclasses.replace(base, beta_mode="fixed", beta=float(beta)),
               f"mcu_fixed_{_slug(label)}_beta{beta:g}", BETA_SEARCH_FIGURES)


def _copy_chosen_figures(cfg: ExperimentConfig, run: RunDir, rows: list[dict]) -> None:
    """Each seed's curve figure of the beta a search chose, as its MCU row's figure in
    ``curves/`` (where the other rows' figures are)."""
    for row in rows:
        if "beta" not in row:
            continue
        chosen = _slug(beta_row_name(row["method"], row["beta"]))
        for seed in cfg.seeds:
            source = run.path(BETA_SEARCH_FIGURES, f"{chosen}_seed{seed}.png")
            if source.is_file():
                target = run.path("curves", f"{_slug(row['method'])}_seed{seed}.png")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


def choose_fixed_betas(cfg: ExperimentConfig, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows, searched): each method's beta-search rows replaced by one MCU row, the value
    with the smallest Avg. Gap to RT (the table's, over seeds, compared unrounded; exact ties:
    the first value), which records ``beta``; ``searched`` holds every value's row. Without
    a search, (rows, [])."""
    if not cfg.fixed_betas or "fixed" not in cfg.mcu_modes:
        return rows, []
    class_wise = cfg.problem.scenario == "class"

    def gap(row: dict) -> float:
        value = metrics.table_avg_gap(rows, row, class_wise)
        return math.inf if value is None else value

    by_name = {row["method"]: row for row in rows}
    chosen, searched = {}, []  # chosen: the chosen value's row name -> the MCU row
    for method in cfg.methods:
        label = row_name(method, "fixed")
        values = [(beta, by_name[beta_row_name(label, beta)]) for beta in cfg.fixed_betas]
        beta, row = min(values, key=lambda value: gap(value[1]))  # ties: the first
        chosen[row["method"]] = {**row, "method": label, "beta": beta}
        searched += [row for _, row in values]
    dropped = {row["method"] for row in searched} - set(chosen)
    return [chosen.get(r["method"], r) for r in rows if r["method"] not in dropped], searched


def _evaluated(run: RunDir, phase: str, prob, variables, cfg, seed, extra: dict,
               mesh=None) -> dict:
    if run.phase_done(phase):
        return run.load_phase(phase)
    result = {**evaluate_model(prob, variables, cfg.mia, seed, mesh), **extra}
    run.mark_done(phase, result)
    return result


def mcu_row(ctx: SeedContext, base, mcu_cfg: MCUConfig, mask_cfg, sel_cfg, key, label: str,
            out_name: str, figures: str | None = "curves") -> dict:
    """MCU on top of ``base`` (a MethodResult), evaluated like every other row; its curve
    figure goes to the run's folder ``figures`` (None: no figure).

    The row also keeps the sweep (``sweep``: ts and accuracies per set) so figures can be
    redrawn from the run folder alone.
    """
    phase = f"{out_name}_{ctx.seed}"
    if ctx.run.phase_done(phase):
        return ctx.run.load_phase(phase)
    prob = ctx.prob
    out = pipeline.run_mcu(
        prob.model, ctx.theta_o, base.variables, prob.train, prob.test, prob.split, ctx.refs,
        key, dataclasses.replace(mcu_cfg, progress=ctx.cfg.progress), mask_cfg, sel_cfg,
        out_dir=ctx.seed_dir / out_name, mesh=ctx.mesh,
    )
    if out.measured_probs is not None:  # run_mcu measured theta(t*) already: no second pass
        result = scored_metrics(out.measured, out.measured_probs, ctx.cfg.mia, ctx.seed)
    else:
        result = evaluate_model(prob, out.variables, ctx.cfg.mia, ctx.seed, ctx.mesh)
    phase_minutes = {k: float(v) for k, v in out.minutes.items()}
    result.update(
        rte_min=float(base.minutes) + sum(phase_minutes.values()),
        rte_phases={"pre_unlearning": float(base.minutes), **phase_minutes},
        t_star=out.t_star,
        region=[list(r) for r in out.region],
        measured_gap=out.measured_gap,
        sweep={"ts": out.sweep.ts.tolist(),
               "acc": {k: v.tolist() for k, v in out.sweep.acc.items()}},
    )
    result["mask_trained"] = masks.trained_fraction(out.mask, ctx.theta_o["params"])
    epoch_s = steady_epoch_seconds(out.epoch_seconds)
    if epoch_s is not None:  # seconds per curve-training epoch, compilation excluded
        result["rte_curve_epoch_s"] = epoch_s
    if figures is not None:
        png = ctx.run.path(figures, f"{_slug(label)}_seed{ctx.seed}.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        # The star's label: the measured theta(t*)'s gap to RT (not the sweep interpolated).
        plots.curve_figure(
            out.sweep.ts, out.sweep.acc, ctx.rt["acc"], out.region, out.t_star,
            plots.rt_gap(out.measured, ctx.rt["acc"]),
            title=f"{label} ({ctx.cfg.name}, seed {ctx.seed})", path=png,
        )
        result["figure"] = str(png)
    ctx.run.mark_done(phase, result)
    return result


def _slug(label: str) -> str:
    return label.replace("+", "plus").replace(" ", "_")


TABLE_NOTE = ("Cells: mean ± std over seeds (population std) and, in brackets, |mean - RT's "
              "mean|; Avg. Gap: the mean of a row's bracketed gaps; RTE: minutes.")

BETA_SEARCH_NOTE = ("Each MCU (fixed beta) row above is the value of `fixed_betas` below with "
                    "the smallest Avg. Gap to RT, as the paper's MCU rows (\"best results "
                    "achieved through hyperparameter beta search\"): a choice that needs RT, "
                    "which MCU_beta does without.")

ROW_KEYS = (
    "UA", "UA_test", "RA", "TA", "MIA", "avg_gap", "rte_min", "rte_phases", "rte_curve_epoch_s",
    "t_star", "region", "mask_trained",
)


def open_run(out: Path, record: dict, cfg: ExperimentConfig) -> RunDir:
    """The run folder ``out`` bound to ``record``; a new folder only once the first seed's
    problem has been made (``problem.check``), so that a data set, split or model that
    cannot be made is refused before the folder is bound to it."""
    run = RunDir(out)
    if not run.bound():
        problem.check(dataclasses.replace(cfg.problem, seed=cfg.seeds[0]))
    run.open(record)
    return run


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Runs (or resumes) every seed of ``cfg``; returns the run folder."""
    cfg = paper_defaults(cfg)
    out = Path(cfg.out_dir) / cfg.name
    run = open_run(out, config.to_dict(cfg), cfg)
    start = time.perf_counter()
    per_seed = []
    for seed in cfg.seeds:
        rows = run_seed(cfg, run, seed)
        per_seed.append(
            {k: {m: v for m, v in r.items() if m in ROW_KEYS} for k, r in rows.items()}
        )
    rows, searched = choose_fixed_betas(cfg, metrics.rows_over_seeds(per_seed))
    _copy_chosen_figures(cfg, run, rows)
    class_wise = cfg.problem.scenario == "class"
    results = {"config": config.to_dict(cfg), "rows": rows}
    if searched:
        results["beta_search"] = searched
    checkpoint.write_json(out / "results.json", results)
    table = metrics.markdown_table(rows, class_wise=class_wise)
    text = (f"# {cfg.name}\n\nCommand: `{rerun_command(cfg)}`\n\nSeeds: {list(cfg.seeds)}\n\n"
            f"{TABLE_NOTE}\n\n{table}\n")
    if cfg.table1:
        text += "\n## Table 1 layout\n\n" + metrics.table1_markdown(rows) + "\n"
    if searched:
        chosen = ", ".join(f"{r['method']}: beta = {r['beta']:g}" for r in rows if "beta" in r)
        text += (f"\n## MCU's beta search\n\n{BETA_SEARCH_NOTE} Chosen: {chosen}.\n\n"
                 + metrics.markdown_table([r for r in rows if r["method"] == "RT"] + searched,
                                          class_wise=class_wise) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    print(f"run folder: {out.resolve()}  ({(time.perf_counter() - start) / 60:.2f} min)")
    return out
