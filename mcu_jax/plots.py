"""The paper's figures: the mask's speed and a random mask (Figure 2), accuracy along the
curve (Figures 3-7) and vs the share of D_r (8-9).

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot: no
global backend is switched, no figure is registered in pyplot's list (so nothing is left
open after saving), and the returned ``Figure`` still displays in a notebook. With ``path``
the figure is also written as a PNG whose pixel size is ``figsize * dpi``.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CURVE_KEYS = ("retain", "forget", "test", "test_forget", "test_retain")
LABELS = {
    "retain": r"$\mathcal{D}_r$",
    "forget": r"$\mathcal{D}_f$",
    "test": r"$\mathcal{D}_t$",
    "test_forget": r"$\mathcal{D}_{tf}$",
    "test_retain": r"$\mathcal{D}_{tr}$",
}
COLORS = {
    "retain": "tab:blue",
    "forget": "tab:red",
    "test": "tab:green",
    "test_forget": "tab:orange",
    "test_retain": "tab:purple",
}
REGION_COLOR = "0.6"
PANEL_KEYS = ("label", "ts", "acc", "rt_acc", "region", "t_star", "star_gap", "highlight")
DPI = 150


def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=fig.dpi)


def _curves(ts: Any, acc: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"ts must be a non-empty 1-D array of t values, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)):
        raise ValueError("ts must be finite")
    if not isinstance(acc, Mapping) or not acc:
        raise ValueError(f"acc must be a non-empty dict set name -> accuracies, got {acc!r}")
    unknown = [k for k in acc if k not in CURVE_KEYS]
    if unknown:
        raise ValueError(f"acc has unknown keys {unknown}; known: {CURVE_KEYS}")
    curves = {}
    for key in CURVE_KEYS:
        if key not in acc:
            continue
        values = np.asarray(acc[key], dtype=np.float64)
        if values.shape != ts.shape:
            raise ValueError(
                f"acc[{key!r}] must have the shape of ts {ts.shape}, got {values.shape}"
            )
        curves[key] = values
    return ts, curves


def _regions(region: Any) -> list[tuple[float, float]]:
    out = []
    for i, interval in enumerate(region or []):
        try:
            start, end = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ValueError(f"region[{i}] must be a pair (start, end), got {interval!r}") from None
        if not (math.isfinite(start) and math.isfinite(end) and start <= end):
            raise ValueError(f"region[{i}] must satisfy start <= end, got {interval!r}")
        out.append((start, end))
    return out


def _rt_value(rt_acc: Mapping[str, Any] | None, key: str) -> float | None:
    if rt_acc is None or rt_acc.get(key) is None:
        return None
    value = float(rt_acc[key])
    return value if math.isfinite(value) else None


#: The sets whose gap to RT labels the star: D_r, D_f, D_t and, class-wise, D_tf (the paper's
#: Figure 3 caption); D_tr, drawn too, is left out of the number.
STAR_GAP_SETS = ("retain", "forget", "test", "test_forget")


def rt_gap(acc: Mapping[str, Any], rt_acc: Mapping[str, Any] | None) -> float | None:
    """Mean |acc - RT| over the ``STAR_GAP_SETS`` both give (finite) values for; None if
    none. The star's label of a curve figure, from a measured model's accuracies."""
    gaps = [
        abs(float(acc[k]) - _rt_value(rt_acc, k))
        for k in STAR_GAP_SETS
        if acc.get(k) is not None and _rt_value(rt_acc, k) is not None
        and math.isfinite(float(acc[k]))
    ]
    return float(np.mean(gaps)) if gaps else None


def _draw_curves(
    ax,
    ts: Any,
    acc: Any,
    rt_acc: Mapping[str, Any] | None,
    region: Any,
    t_star: float | None,
    star_gap: float | None,
) -> None:
    """Curves, RT lines, effective region and star on one axes (shared by every curve plot)."""
    ts, curves = _curves(ts, acc)
    if rt_acc is not None and not isinstance(rt_acc, Mapping):
        raise ValueError(f"rt_acc must be a dict set name -> accuracy or None, got {rt_acc!r}")
    for i, (start, end) in enumerate(_regions(region)):
        ax.axvspan(
            start,
            end,
            color=REGION_COLOR,
            alpha=0.25,
            lw=0,
            label="effective region" if i == 0 else None,
        )
    for key, values in curves.items():
        color = COLORS[key]
        ax.plot(ts, values, color=color, marker="o", ms=2.5, lw=1.5, label=LABELS[key])
        rt = _rt_value(rt_acc, key)
        if rt is not None:
            ax.axhline(rt, color=color, ls=":", lw=1.2)
    if t_star is not None:
        t_star = float(t_star)
        if not (math.isfinite(t_star) and ts.min() <= t_star <= ts.max()):
            raise ValueError(f"t_star must lie within ts [{ts.min()}, {ts.max()}], got {t_star}")
        order = np.argsort(ts)
        stars = {k: float(np.interp(t_star, ts[order], v[order])) for k, v in curves.items()}
        for key, y in stars.items():
            ax.plot(
                [t_star],
                [y],
                marker="*",
                ms=13,
                color=COLORS[key],
                mec="black",
                mew=0.6,
                ls="none",
                zorder=5,
            )
        if star_gap is None:
            star_gap = rt_gap(stars, rt_acc)
        if star_gap is not None and math.isfinite(float(star_gap)):
            top = max(stars.values())
            ax.annotate(
                f"{float(star_gap):.2f}",
                (t_star, top),
                xytext=(-6, 8),
                textcoords="offset points",
                ha="right",
                fontsize=9,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7"},
            )
    ax.set_xlabel("t")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)


def curve_figure(
    ts: Any,
    acc: Mapping[str, Any],
    rt_acc: Mapping[str, float] | None,
    region: Sequence[tuple[float, float]],
    t_star: float | None,
    star_gap: float | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
    *,
    figsize: tuple[float, float] = (5.0, 3.6),
    dpi: int = DPI,
) -> Figure:
    """The paper's Figure 3: accuracy on D_r, D_f, D_t (D_tf, D_tr) along the curve.

    ``acc`` maps "retain", "forget", "test", "test_forget", "test_retain" (those present)
    to accuracies over ``ts``; each curve gets RT's accuracy from ``rt_acc`` as a dotted line
    of its colour (skipped where missing). The effective region ``[(start, end), ...]`` is
    shaded grey, and t* (the selected model) is starred on every curve (linearly
    interpolated at t*) and labelled with ``star_gap`` (the experiment runner passes
    :func:`rt_gap` of the measured theta(t*)); without it, the mean |curve(t*) - RT| over the
    curves of ``STAR_GAP_SETS`` that have an RT value (D_r, D_f, D_t, and D_tf class-wise, as
    the paper's caption). ``t_star=None`` draws no star.
    """
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    _draw_curves(ax, ts, acc, rt_acc, region, t_star, star_gap)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)
    return fig


def ablation_figure(
    panels: Sequence[Mapping[str, Any]],
    title: str = "",
    path: str | os.PathLike | None = None,
    *,
    panel_size: tuple[float, float] = (3.0, 2.8),
    dpi: int = DPI,
) -> Figure:
    """A row of curve panels, one per setting (the beta / k / k_r ablations and the
    under/over-forgetting comparison, paper Figures 4-7).

    Each panel is a dict with "label", "ts", "acc" and optionally "rt_acc", "region",
    "t_star", "star_gap" (as in ``curve_figure``) and "highlight" (frame it in red, as the
    paper marks its default setting). One legend below the row serves every panel.
    """
    if isinstance(panels, Mapping) or not isinstance(panels, Sequence) or not panels:
        raise ValueError(f"panels must be a non-empty list of dicts, got {panels!r}")
    for i, panel in enumerate(panels):
        if not isinstance(panel, Mapping):
            raise ValueError(f"panels[{i}] must be a dict, got {panel!r}")
        missing = [k for k in ("label", "ts", "acc") if k not in panel]
        unknown = [k for k in panel if k not in PANEL_KEYS]
        if missing or unknown:
            raise ValueError(
                f"panels[{i}] lacks {missing} / has unknown keys {unknown}; keys: {PANEL_KEYS}"
            )
    n = len(panels)
    width, height = panel_size
    fig = _new_figure((width * n, height + 0.5), dpi)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        _draw_curves(
            ax,
            panel["ts"],
            panel["acc"],
            panel.get("rt_acc"),
            panel.get("region"),
            panel.get("t_star"),
            panel.get("star_gap"),
        )
        ax.set_title(
            str(panel["label"]), fontsize=10, color="tab:red" if panel.get("highlight") else "black"
        )
        if panel.get("highlight"):
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(2.0)
    for ax in axes[1:]:
        ax.set_ylabel("")
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.legend(
        [handles[k] for k in labels],
        labels,
        loc="outside lower center",
        ncol=len(labels),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return fig


_SHARE_STYLE = {
    "UA": ("tab:red", "UA"),
    "UA_test": ("tab:orange", "UA$_{test}$"),
    "RA": ("tab:blue", "RA"),
    "TA": ("tab:green", "TA"),
    "MIA": ("tab:purple", "MIA"),
    **{k: (COLORS[k], LABELS[k]) for k in CURVE_KEYS},
}


def retain_share_figure(
    shares: Sequence[float],
    metrics: Mapping[str, Sequence[float]],
    path: str | os.PathLike | None = None,
    title: str = "",
    *,
    figsize: tuple[float, float] = (5.0, 3.6),
    dpi: int = DPI,
) -> Figure:
    """Metrics of the optimal model vs the share of D_r used in curve training (Figures 8-9).

    ``shares`` are fractions in (0, 1], drawn as percent. ``metrics`` maps a name (UA, RA,
    TA, MIA, a set name such as "forget", or any other) to one value per share; names
    containing "gap" (e.g. "Avg. Gap") go on a second y-axis on the right, since gaps are
    a few points while accuracies are near 100.
    """
    x = np.asarray(shares, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"shares must be a non-empty 1-D list, got shape {x.shape}")
    if not np.all(np.isfinite(x)) or x.min() <= 0 or x.max() > 1:
        raise ValueError(f"shares must be fractions in (0, 1] (0.1 for 10%), got {list(x)}")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"metrics must be a non-empty dict name -> values, got {metrics!r}")
    series = {}
    for name, values in metrics.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != x.shape:
            raise ValueError(
                f"metrics[{name!r}] must have one value per share {x.shape}, got {values.shape}"
            )
        series[name] = values
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    gap_ax = None
    gaps = 0
    handles = []
    for i, (name, values) in enumerate(series.items()):
        color, label = _SHARE_STYLE.get(name, (f"C{i % 10}", name))
        if "gap" in name.lower():
            if gap_ax is None:
                gap_ax = ax.twinx()
                gap_ax.set_ylabel("gap (%)")
            gap_color = color if name in _SHARE_STYLE else ("black", "0.45", "tab:brown")[gaps % 3]
            gaps += 1
            (line,) = gap_ax.plot(
                100 * x, values, color=gap_color, ls="--", marker="s", ms=4, label=label
            )
        else:
            (line,) = ax.plot(100 * x, values, color=color, marker="o", ms=4, label=label)
        handles.append(line)
    ax.set_xlabel(r"share of $\mathcal{D}_r$ used (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)
    return fig


def mask_figure(
    epoch_seconds: Mapping[str, float | None],
    panels: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    title: str = "",
    *,
    panel_size: tuple[float, float] = (3.6, 3.0),
    dpi: int = DPI,
) -> Figure:
    """The paper's Figure 2: curve-training seconds per epoch with and without the mask (bars,
    left), and accuracy along t with the parameter mask (solid) and a random mask of the same
    budget (dashed), one panel per budget.

    ``epoch_seconds`` maps a bar label (e.g. "no mask") to seconds, or None when not timed
    (drawn as "n/a"). Each panel is a dict with "label", "ts", "solid" and "dashed" (accuracy
    dicts as in ``curve_figure``).
    """
    if not isinstance(epoch_seconds, Mapping) or not epoch_seconds:
        raise ValueError(f"epoch_seconds must be a non-empty dict label -> seconds, got "
                         f"{epoch_seconds!r}")
    if isinstance(panels, Mapping) or not isinstance(panels, Sequence) or not panels:
        raise ValueError(f"panels must be a non-empty list of dicts, got {panels!r}")
    for i, panel in enumerate(panels):
        missing = [k for k in ("label", "ts", "solid", "dashed")
                   if not isinstance(panel, Mapping) or k not in panel]
        if missing:
            raise ValueError(f"panels[{i}] lacks {missing}")
    width, height = panel_size
    fig = _new_figure((width * (1 + len(panels)), height + 0.5), dpi)
    bars, *axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
    labels = list(epoch_seconds)
    values = [epoch_seconds[k] for k in labels]
    heights = [0.0 if v is None else float(v) for v in values]
    drawn = bars.bar(range(len(labels)), heights, color=[f"C{i}" for i in range(len(labels))])
    bars.bar_label(drawn, ["n/a" if v is None else f"{v:.3g}" for v in values], fontsize=8)
    bars.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    bars.set_ylabel("curve training (s / epoch)")
    bars.grid(axis="y", alpha=0.3)
    for ax, panel in zip(axes, panels, strict=True):
        for style, key in (("-", "solid"), ("--", "dashed")):
            ts, curves = _curves(panel["ts"], panel[key])
            for name, acc in curves.items():
                ax.plot(ts, acc, color=COLORS[name], ls=style, marker="o", ms=2.5, lw=1.5,
                        label=f"{LABELS[name]}, {'parameter' if key == 'solid' else 'random'}")
        ax.set_title(f"{panel['label']}: parameter (solid), random (dashed)", fontsize=9)
        ax.set_xlabel("t")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 3), fontsize=8,
               frameon=False)
    if title:  # wrapped: this figure is narrower than its title may be
        fig.suptitle(textwrap.fill(title, int(11 * fig.get_figwidth())), fontsize=10)
    _save(fig, path)
    return fig
