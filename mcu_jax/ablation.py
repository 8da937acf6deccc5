"""Ablation sweeps of the paper: the mask's speed and a random mask (Figure 2), beta, k,
k_r (Figures 4-6), under- vs over-forgetting theta_p (Figure 7) and the share of D_r used
for curve training (Figures 8-9).

Each sweep shares theta_o, RT and (except ``forgetting``) the base method with the
experiment it extends, varies one setting, runs MCU once per value and draws one figure.
Results go to ``results.json``/``results.md`` like the main runner's, one row per value.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mcu_jax import checkpoint, checks, config, metrics, plots
from mcu_jax.data import make_split
from mcu_jax.experiment import (
    DISPLAY,
    ROW_KEYS,
    TABLE_NOTE,
    ExperimentConfig,
    SeedContext,
    _evaluated,
    base_model,
    check_base_method,
    mcu_config,
    mcu_row,
    method_config,
    name_key,
    open_run,
    paper_defaults,
    prepare_seed,
    rerun_command,
)

KINDS = {
    "mask": "no mask vs parameter mask (k = k_r = value) vs random mask, MCU (Figure 2)",
    "beta": "fixed beta of MCU (Figure 4)",
    "k": "mask k of MCU (Figure 5)",
    "k_r": "mask k_r of MCU (Figure 6)",
    "forgetting": "base-method epochs: under- vs over-forgetting theta_p, MCU_beta (Figure 7)",
    "retain_share": "share of D_r used for curve training, MCU_beta (Figures 8-9)",
}


#: The paper's default of each varied setting (the value its figures frame).
PAPER_DEFAULTS = {"mask": 0.1, "beta": 0.2, "k": 0.5, "k_r": 0.1, "retain_share": 0.5}


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    experiment: ExperimentConfig = ExperimentConfig()
    kind: str = "beta"
    values: tuple[float, ...] = (0.1, 0.2, 0.3)
    method: str = "neggrad"  # the base method theta_p (Figure 7 uses RL)
    # The value framed in red in the figure; None: the paper's default of the kind (beta 0.2,
    # k 0.5, k_r 0.1, retain share 0.5; none for forgetting).
    default: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown ablation {self.kind!r}; known: {tuple(KINDS)}")
        check_base_method(self.method, "method")
        if not self.values:
            raise ValueError("values must list at least one setting")
        for v in self.values:
            # k = 0 keeps no tensor and k_r = 1 drops every one: MCU would have nothing to
            # train, found only when that value's run is reached
            if self.kind == "k_r" and not 0.0 <= v < 1.0:
                raise ValueError(f"values: k_r={v} is outside [0, 1) (1 drops every tensor)")
            if self.kind in ("k", "retain_share", "mask") and not 0.0 < v <= 1.0:
                raise ValueError(f"values: {self.kind}={v} is outside (0, 1]")
            if self.kind == "beta":
                checks.number("values: beta", v, low=0)
            if self.kind == "forgetting" and not (float(v).is_integer() and v >= 1):
                raise ValueError(f"values: forgetting={v}; expected whole epochs >= 1")


def _label(kind: str, value: float) -> str:
    if kind == "forgetting":
        return f"{int(value)} epochs"
    if kind == "retain_share":
        return f"{100 * value:g}% of D_r"
    if kind == "mask":
        return f"{100 * value:g}% mask"
    return f"{kind}={value:g}"


def _mask_variants(exp: ExperimentConfig, value: float, seed: int) -> dict[str, tuple]:
    """Figure 2's curves for budget ``value``: "none", "parameter" and "random" -> (label,
    out_name, MaskConfig) of no mask, the parameter mask (k = k_r = value) and a random mask
    of the same element budget drawn from the seed. The unmasked curve does not depend on
    the value (one run serves all)."""
    mask = dataclasses.replace(exp.mask, enabled=True)
    budget = _label("mask", value)
    return {
        "none": ("no mask", "ablation_mask_none", dataclasses.replace(mask, enabled=False)),
        "parameter": (f"parameter {budget}", f"ablation_mask_parameter_{value:g}",
                      dataclasses.replace(mask, kind="parameter", k=value, k_r=value)),
        "random": (f"random {budget}", f"ablation_mask_random_{value:g}",
                   dataclasses.replace(mask, kind="random", k=value, seed=seed)),
    }


def _mask_row_name(cfg: AblationConfig, label: str) -> str:
    """The table row of one of Figure 2's curves."""
    return f"MCU-{DISPLAY.get(cfg.method, cfg.method)} ({label})"


def _point(cfg: AblationConfig, ctx: SeedContext, value: float) -> dict[str, dict]:
    """The rows one value contributes for one seed. Every value trains its curve with the
    same key (the main table's key for this method): only the varied setting differs
    between the points, not the sampled t or the batch order."""
    exp = cfg.experiment
    kind, tag = cfg.kind, f"{cfg.kind}_{value:g}"
    name = DISPLAY.get(cfg.method, cfg.method)
    key = name_key(ctx.curve_key, cfg.method)
    mcu_cfg, mask_cfg = mcu_config(exp), exp.mask
    rows = {}
    if kind == "forgetting":
        mcfg = dataclasses.replace(method_config(exp, cfg.method), epochs=int(value))
        base = base_model(ctx, cfg.method, mcfg, out_name=f"{cfg.method}_{tag}")
        rows[f"{name} ({_label(kind, value)})"] = _evaluated(
            ctx.run, f"eval_{cfg.method}_{tag}_{ctx.seed}", ctx.prob, base.variables, exp,
            ctx.seed, {"rte_min": base.minutes}, ctx.mesh,
        )
        mcu_cfg = dataclasses.replace(mcu_cfg, beta_mode="adaptive")
    else:
        base = base_model(ctx, cfg.method)
        if kind == "retain_share":
            d = ctx.prob.config
            split = make_split(
                ctx.prob.dataset, d.scenario, d.forget_ratio, d.forget_class, d.val_ratio,
                retain_ratio=value, seed=ctx.seed,
            )
            ctx = dataclasses.replace(ctx, prob=dataclasses.replace(ctx.prob, split=split))
            mcu_cfg = dataclasses.replace(mcu_cfg, beta_mode="adaptive")
        else:  # the paper's mask / beta / k / k_r ablations run fixed-beta MCU
            mcu_cfg = dataclasses.replace(mcu_cfg, beta_mode="fixed")
            if kind == "mask":
                for label, out_name, vmask in _mask_variants(exp, value, ctx.seed).values():
                    rows[_mask_row_name(cfg, label)] = mcu_row(
                        ctx, base, mcu_cfg, vmask, exp.selection, key, f"MCU-{name} {label}",
                        out_name, figures=None,
                    )
                return rows
            if kind == "beta":
                mcu_cfg = dataclasses.replace(mcu_cfg, beta=value)
            else:
                mask_cfg = dataclasses.replace(mask_cfg, **{kind: value})
    prefix = "MCU" if mcu_cfg.beta_mode == "fixed" else "MCU_beta"
    rows[f"{prefix}-{name} ({_label(kind, value)})"] = mcu_row(
        ctx, base, mcu_cfg, mask_cfg, exp.selection, key, f"{prefix}-{name} {tag}",
        f"ablation_{tag}", figures=None,
    )
    return rows


def _mask_rows(cfg: AblationConfig, rows: list[dict]) -> dict[str, dict]:
    """The Figure 2 rows (combined over seeds) by curve label, in the order of the values."""
    by_method = {r["method"]: r for r in rows}
    return {label: by_method[_mask_row_name(cfg, label)] for value in cfg.values
            for label, _, _ in _mask_variants(cfg.experiment, value, 0).values()}


def _mean(row: dict, key: str) -> float | None:
    return row[key]["mean"] if key in row else None


def mask_note(trained: dict[str, float | None], seconds: dict[str, float | None]) -> str:
    """results.md's lines on Figure 2's curves: the share of elements each mask trains (whole
    tensors, so it can exceed the budget) and the seconds per curve-training epoch (None:
    not timed: no session trained it for more than one epoch), relative to no mask."""
    base = seconds.get("no mask")
    parts = []
    for label, sec in seconds.items():
        share = "" if trained.get(label) is None else f", trains {100 * trained[label]:.1f}%"
        if sec is None:
            parts.append(f"{label}{share}: not timed")
        elif label == "no mask" or not base:
            parts.append(f"{label}{share}: {sec:.3g} s")
        else:
            change = 100 * (1 - sec / base)
            parts.append(f"{label}{share}: {sec:.3g} s ({abs(change):.1f}% "
                         f"{'less' if change >= 0 else 'more'})")
    return ("Curve training, seconds per epoch (mean over seeds; each session's first epoch, "
            f"which compiles, excluded): {'; '.join(parts)}.\n\n")


def default_value(cfg: AblationConfig) -> float | None:
    """The value framed in the figure: ``cfg.default``, or the paper's default of the kind
    (resolved here, not when the config is made, so that another ``kind`` given later, e.g.
    on the command line, gets its own)."""
    return cfg.default if cfg.default is not None else PAPER_DEFAULTS.get(cfg.kind)


def with_paper_defaults(cfg: AblationConfig) -> AblationConfig:
    """``cfg`` with its experiment's unset groups written out (``experiment.paper_defaults``)."""
    return dataclasses.replace(cfg, experiment=paper_defaults(cfg.experiment))


def run_ablation(cfg: AblationConfig) -> Path:
    """Runs (or resumes) the sweep over ``cfg.values`` for every seed; returns the folder."""
    cfg = dataclasses.replace(with_paper_defaults(cfg), default=default_value(cfg))  # recorded
    exp = cfg.experiment
    out = Path(exp.out_dir) / exp.name
    run = open_run(out, config.to_dict(cfg), exp)
    start = time.perf_counter()
    per_seed, panels = [], []
    for seed in exp.seeds:
        ctx = prepare_seed(exp, run, seed)
        rows = {"RT": ctx.rt}
        if cfg.kind != "forgetting":  # the shared theta_p, for comparison
            base = base_model(ctx, cfg.method)
            rows[DISPLAY.get(cfg.method, cfg.method)] = _evaluated(
                run, f"eval_{cfg.method}_{seed}", ctx.prob, base.variables, exp, seed,
                {"rte_min": base.minutes}, ctx.mesh,
            )
        for value in cfg.values:
            point = _point(cfg, ctx, value)
            rows.update(point)
            if seed == exp.seeds[0] and cfg.kind == "mask":
                variants = _mask_variants(exp, value, seed)
                param, rand = (point[_mask_row_name(cfg, variants[v][0])]["sweep"]
                               for v in ("parameter", "random"))
                panels.append({"label": _label(cfg.kind, value), "ts": param["ts"],
                               "solid": param["acc"], "dashed": rand["acc"]})
            elif seed == exp.seeds[0]:
                mcu = list(point.values())[-1]
                panels.append({
                    "label": _label(cfg.kind, value), "ts": mcu["sweep"]["ts"],
                    "acc": mcu["sweep"]["acc"], "rt_acc": ctx.rt["acc"],
                    "region": mcu["region"], "t_star": mcu["t_star"],
                    "star_gap": plots.rt_gap(mcu["acc"], ctx.rt["acc"]),
                    "highlight": value == default_value(cfg),
                })
        for row in rows.values():
            row["avg_gap"] = metrics.avg_gap(row, rows["RT"])
        per_seed.append(
            {k: {m: v for m, v in r.items() if m in ROW_KEYS} for k, r in rows.items()}
        )
    rows = metrics.rows_over_seeds(per_seed)
    note = ""
    figure = out / f"ablation_{cfg.kind}.png"
    title = f"{exp.name}: {KINDS[cfg.kind]}"
    class_wise = exp.problem.scenario == "class"
    if cfg.kind == "retain_share":
        mcu_rows = [r for r in rows if r["method"].startswith("MCU")]
        series = {k: [r[k]["mean"] for r in mcu_rows] for k in ("UA", "RA", "TA")}
        # The Avg. Gap the table prints (gap of the means), not the mean of per-seed gaps.
        series["avg_gap"] = [metrics.table_avg_gap(rows, r, class_wise) for r in mcu_rows]
        plots.retain_share_figure(list(cfg.values), series, path=figure, title=title)
    elif cfg.kind == "mask":
        curves = _mask_rows(cfg, rows)
        seconds = {label: _mean(r, "rte_curve_epoch_s") for label, r in curves.items()}
        plots.mask_figure(seconds, panels, path=figure, title=title)
        note = mask_note({label: _mean(r, "mask_trained") for label, r in curves.items()},
                         seconds)
    else:
        plots.ablation_figure(panels, title=title, path=figure)
    results = {"config": config.to_dict(cfg), "ablation": cfg.kind, "rows": rows}
    checkpoint.write_json(out / "results.json", results)
    text = (f"# {exp.name}\n\nCommand: `{rerun_command(exp)}`\n\nAblation: {KINDS[cfg.kind]}, "
            f"values {list(cfg.values)}; seeds {list(exp.seeds)}\n\n{TABLE_NOTE}\n\n"
            f"{metrics.markdown_table(rows, class_wise=class_wise)}\n\n{note}"
            f"Figure: `{figure.name}`\n")
    (out / "results.md").write_text(text)
    print(text)
    print(f"run folder: {out.resolve()}  ({(time.perf_counter() - start) / 60:.2f} min)")
    return out

