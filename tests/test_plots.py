"""The paper's figures render to PNGs of the expected size, with and without optional parts."""

import numpy as np
import pytest
from PIL import Image

from mcu_jax import plots

TS = np.linspace(0.0, 1.0, 20)
ACC = {
    "retain": 100.0 - 2.0 * TS,
    "forget": 88.0 + 10.0 * TS,
    "test": 89.0 + 0.5 * TS,
}
RT = {"retain": 99.98, "forget": 89.46, "test": 89.59}


def _png_size(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_curve_figure_writes_png(tmp_path):
    path = tmp_path / "curve.png"
    fig = plots.curve_figure(
        TS,
        ACC,
        RT,
        [(0.2, 0.5), (0.6, 0.95)],
        0.85,
        0.42,
        title="MCU_beta-NegGrad+",
        path=path,
        figsize=(4.0, 3.0),
        dpi=50,
    )
    assert _png_size(path) == ("PNG", (200, 150))
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "effective region",
        r"$\mathcal{D}_r$",
        r"$\mathcal{D}_f$",
        r"$\mathcal{D}_t$",
    ]
    assert [t.get_text() for t in ax.texts] == ["0.42"]
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
    np.testing.assert_allclose(spans, [(0.2, 0.5), (0.6, 0.95)])  # one span per region
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(stars) == 3
    star_y = sorted(float(s.get_ydata()[0]) for s in stars)
    assert star_y == pytest.approx(sorted([100 - 1.7, 88 + 8.5, 89 + 0.425]))


def test_curve_figure_class_wise_missing_rt_and_empty_region(tmp_path):
    acc = {**ACC, "test_forget": 30.0 * (1 - TS), "test_retain": 90.0 + 0 * TS}
    path = tmp_path / "class.png"
    fig = plots.curve_figure(
        TS, acc, {"retain": 99.0, "test_forget": float("nan")}, [], 0.9, path=str(path)
    )
    assert _png_size(path)[0] == "PNG"
    ax = fig.axes[0]
    dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(dotted) == 1  # only D_r has an RT value
    assert "effective region" not in ax.get_legend_handles_labels()[1]
    # without star_gap the label is the mean |curve(t*) - RT| over curves with an RT value
    assert [t.get_text() for t in ax.texts] == [f"{abs(100 - 1.8 - 99.0):.2f}"]
    # ... among D_r, D_f, D_t and D_tf: D_tr's curve is drawn but left out of the number
    fig = plots.curve_figure(TS, acc, {"retain": 99.0, "test_retain": 10.0}, [], 0.9)
    assert [t.get_text() for t in fig.axes[0].texts] == [f"{abs(100 - 1.8 - 99.0):.2f}"]


def test_curve_figure_without_rt_or_star_returns_figure():
    fig = plots.curve_figure(TS, ACC, None, [], None)
    assert len(fig.axes[0].texts) == 0
    assert not any(line.get_marker() == "*" for line in fig.axes[0].lines)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"acc": {"retain": [1.0, 2.0]}}, r"acc\['retain'\] must have the shape of ts"),
        ({"acc": {"valid": TS}}, "unknown keys"),
        ({"acc": {}}, "acc must be a non-empty dict"),
        ({"t_star": 1.5}, "t_star must lie within ts"),
        ({"region": [(0.5, 0.2)]}, r"region\[0\]"),
        ({"region": [0.5]}, r"region\[0\] must be a pair"),
        ({"ts": [[0.0, 1.0]]}, "ts must be a non-empty 1-D"),
        ({"rt_acc": [1.0]}, "rt_acc must be a dict"),
    ],
)
def test_curve_figure_errors(kwargs, match):
    args = {"ts": TS, "acc": ACC, "rt_acc": RT, "region": [], "t_star": 0.8, **kwargs}
    with pytest.raises(ValueError, match=match):
        plots.curve_figure(**args)


def test_ablation_figure(tmp_path):
    panels = [
        {
            "label": f"beta = {b}",
            "ts": TS,
            "acc": ACC,
            "rt_acc": RT if b != 0.1 else None,
            "region": [(0.3, 0.7)] if b != 0.3 else [],
            "t_star": 0.8,
            "star_gap": 0.5 + b,
            "highlight": b == 0.2,
        }
        for b in (0.1, 0.2, 0.3)
    ]
    panels.append({"label": "minimal", "ts": TS, "acc": {"forget": ACC["forget"]}})
    path = tmp_path / "ablation.png"
    fig = plots.ablation_figure(panels, "beta ablation", path=path, panel_size=(2.0, 2.0), dpi=40)
    assert _png_size(path) == ("PNG", (4 * 80, 100))
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == [
        "beta = 0.1",
        "beta = 0.2",
        "beta = 0.3",
        "minimal",
    ]
    assert (
        fig.axes[1].spines["left"].get_edgecolor()[:3]
        != fig.axes[0].spines["left"].get_edgecolor()[:3]
    )
    assert len(fig.legends) == 1


@pytest.mark.parametrize(
    "panels, match",
    [
        ([], "panels must be a non-empty list"),
        ([{"label": "a", "ts": TS}], r"panels\[0\] lacks \['acc'\]"),
        ([{"label": "a", "ts": TS, "acc": ACC, "beta": 0.1}], r"unknown keys \['beta'\]"),
    ],
)
def test_ablation_figure_errors(panels, match):
    with pytest.raises(ValueError, match=match):
        plots.ablation_figure(panels, "x")


def test_retain_share_figure(tmp_path):
    shares = [0.1, 0.3, 0.5, 1.0]
    metrics = {
        "UA": [9.0, 10.0, 10.3, 10.5],
        "RA": [95.0, 98.0, 98.5, 99.0],
        "TA": [87.0, 88.9, 89.0, 89.2],
        "Avg. Gap": [2.1, 1.2, 1.0, 0.9],
    }
    path = tmp_path / "share.png"
    fig = plots.retain_share_figure(
        shares, metrics, path=path, title="share of D_r", figsize=(3.0, 2.0), dpi=60
    )
    assert _png_size(path) == ("PNG", (180, 120))
    assert len(fig.axes) == 2  # the gap on its own y-axis
    xs = fig.axes[0].lines[0].get_xdata()
    assert list(xs) == pytest.approx([10.0, 30.0, 50.0, 100.0])
    gap = fig.axes[1].lines[0]  # the gap is drawn at the same percentages
    assert list(gap.get_xdata()) == pytest.approx([10.0, 30.0, 50.0, 100.0])
    assert list(gap.get_ydata()) == pytest.approx(metrics["Avg. Gap"])
    plain = plots.retain_share_figure(shares, {"forget": [1, 2, 3, 4]})
    assert len(plain.axes) == 1


@pytest.mark.parametrize(
    "shares, metrics, match",
    [
        ([10, 50, 100], {"UA": [1, 2, 3]}, r"fractions in \(0, 1\]"),
        ([], {"UA": []}, "shares must be a non-empty"),
        ([0.1, 0.5], {"UA": [1.0]}, r"metrics\['UA'\]"),
        ([0.1, 0.5], {}, "metrics must be a non-empty dict"),
    ],
)
def test_retain_share_figure_errors(shares, metrics, match):
    with pytest.raises(ValueError, match=match):
        plots.retain_share_figure(shares, metrics)


def test_rt_gap_averages_the_star_sets_that_have_values():
    acc = {"retain": 90.0, "forget": 10.0, "test": 80.0, "test_retain": 0.0,
           "test_forget": float("nan")}
    rt = {"retain": 100.0, "forget": 20.0, "test": 85.0, "test_retain": 50.0,
          "test_forget": 0.0}
    # D_tr is drawn but not counted; a NaN accuracy (empty set) is skipped.
    assert plots.rt_gap(acc, rt) == pytest.approx((10 + 10 + 5) / 3)
    assert plots.rt_gap(acc, None) is None
    assert plots.rt_gap({"test_retain": 1.0}, rt) is None


def test_mask_figure_bars_and_solid_vs_dashed_curves(tmp_path):
    ts = [0.0, 0.5, 1.0]
    solid = {"retain": [99.0, 98.0, 97.0], "forget": [99.0, 90.0, 85.0]}
    dashed = {"retain": [99.0, 95.0, 93.0], "forget": [99.0, 92.0, 88.0]}
    path = tmp_path / "mask.png"
    fig = plots.mask_figure(
        {"no mask": 2.0, "parameter 10% mask": 0.5, "random 10% mask": None},
        [{"label": "10% mask", "ts": ts, "solid": solid, "dashed": dashed}],
        path=path, title="a title long enough to be wrapped over two lines of this figure",
        panel_size=(3.0, 2.0), dpi=60,
    )
    assert _png_size(path) == ("PNG", (360, 150))
    bars, curves = fig.axes
    assert [b.get_height() for b in bars.patches] == [2.0, 0.5, 0.0]  # not timed: no bar
    assert [t.get_text() for t in bars.texts] == ["2", "0.5", "n/a"]
    styles = {(line.get_label(), line.get_linestyle()) for line in curves.lines}
    assert styles == {(r"$\mathcal{D}_r$, parameter", "-"), (r"$\mathcal{D}_f$, parameter", "-"),
                      (r"$\mathcal{D}_r$, random", "--"), (r"$\mathcal{D}_f$, random", "--")}
    drawn = {line.get_label(): list(line.get_ydata()) for line in curves.lines}
    assert drawn[r"$\mathcal{D}_f$, random"] == dashed["forget"]


@pytest.mark.parametrize("seconds, panels, match", [
    ({}, [{"label": "a", "ts": [0], "solid": {}, "dashed": {}}], "epoch_seconds must be"),
    ({"no mask": 1.0}, [], "panels must be a non-empty"),
    ({"no mask": 1.0}, [{"label": "a", "ts": [0.0]}], r"lacks \['solid', 'dashed'\]"),
])
def test_mask_figure_errors(seconds, panels, match):
    with pytest.raises(ValueError, match=match):
        plots.mask_figure(seconds, panels)
