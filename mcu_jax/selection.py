"""Choosing a model on the curve (paper section 2.5): alignment gap, effective region, optimal t.

All accuracies are in percent. The gap at each sweep point is measured against the original
model's references, a cubic interpolant is fitted to the gaps of a sweep over t, and the
interpolant is searched on a dense grid. The interpolant is the paper's cubic spline
(``kind="cubic"``) or a shape-preserving piecewise cubic (``kind="pchip"``), which never
overshoots the measured gaps: after a steep drop in the gap, or on a plateau of equal gaps,
the spline swings below every measured value and can put t* or pieces of the region where no
measurement supports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.interpolate import CubicSpline, PchipInterpolator

ArrayLike = Any
INTERPOLATIONS = ("cubic", "pchip")


def alignment_gap(
    acc_retain: ArrayLike,
    acc_forget: ArrayLike,
    acc_test: ArrayLike | None,
    ref_train: float,
    ref_val: float,
    include_test: bool = True,
    ref_forget: float | None = None,
) -> float | np.ndarray:
    """Mean absolute deviation of a model's accuracies from the original model's references.

    Terms: ``|acc_retain - ref_train|`` (Acc(D_r) vs Acc_o(D_train)), ``|acc_forget - ref_forget|``
    (Acc(D_f) vs Acc_o(D_v)) and, when ``include_test``, ``|acc_test - ref_val|`` (Acc(D_t) vs
    Acc_o(D_v)). ``ref_forget`` defaults to ``ref_val``; for class-wise forgetting pass
    ``ref_forget=0`` (the forgotten class should not be recognised at all) while the test term
    keeps ``ref_val``. Accuracies may be scalars or arrays over t (broadcast); a float is
    returned for scalar input, an array otherwise.
    """
    ref_forget = ref_val if ref_forget is None else ref_forget
    terms = [
        np.abs(np.asarray(acc_retain, dtype=np.float64) - ref_train),
        np.abs(np.asarray(acc_forget, dtype=np.float64) - ref_forget),
    ]
    if include_test:
        if acc_test is None:
            raise ValueError(
                "acc_test is None but include_test=True; pass acc_test or include_test=False"
            )
        terms.append(np.abs(np.asarray(acc_test, dtype=np.float64) - ref_val))
    gap = sum(np.broadcast_arrays(*terms)) / len(terms)
    return float(gap) if np.ndim(gap) == 0 else gap


def _check_sweep(ts: ArrayLike, gaps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ts = np.asarray(ts, dtype=np.float64)
    gaps = np.asarray(gaps, dtype=np.float64)
    if ts.ndim != 1 or ts.size < 4:
        raise ValueError(f"ts must be a 1-d array of at least 4 points, got shape {ts.shape}")
    if gaps.shape != ts.shape:
        raise ValueError(f"gaps must have the shape of ts {ts.shape}, got {gaps.shape}")
    if not np.all(np.isfinite(ts)) or ts[0] < 0 or ts[-1] > 1:
        raise ValueError(f"ts must lie in [0, 1], got range [{ts.min()}, {ts.max()}]")
    if np.any(np.diff(ts) <= 0):
        i = int(np.argmax(np.diff(ts) <= 0))
        raise ValueError(
            f"ts must be strictly increasing; ts[{i}]={ts[i]} >= ts[{i + 1}]={ts[i + 1]}"
        )
    if not np.all(np.isfinite(gaps)):
        raise ValueError("gaps must be finite")
    return ts, gaps


def interpolate_gap(ts: ArrayLike, gaps: ArrayLike,
                    kind: str = "cubic") -> Callable[[ArrayLike], np.ndarray]:
    """The interpolant through the sweep's gaps: ``kind="cubic"``, the cubic spline (not-a-knot,
    as ``interp1d(kind="cubic")``; the paper's), or ``"pchip"``, the shape-preserving piecewise
    cubic (monotone between samples, so it stays within the measured gaps).

    ``ts`` must be strictly increasing in [0, 1] with at least 4 points.
    """
    ts, gaps = _check_sweep(ts, gaps)
    return _fit(ts, gaps, kind)


def _fit(ts: np.ndarray, gaps: np.ndarray, kind: str):
    """:func:`interpolate_gap` for a checked sweep."""
    if kind not in INTERPOLATIONS:
        raise ValueError(f"kind={kind!r}; expected one of {INTERPOLATIONS}")
    return CubicSpline(ts, gaps) if kind == "cubic" else PchipInterpolator(ts, gaps)


def _runs(grid: np.ndarray, flags: np.ndarray) -> list[tuple[float, float]]:
    """Closed intervals ``[grid[start], grid[end]]`` of consecutive True flags."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(float(grid[s]), float(grid[e])) for s, e in zip(starts, ends, strict=True)]


def effective_region(
    ts: ArrayLike, gaps: ArrayLike, num_dense: int = 1001, kind: str = "cubic"
) -> list[tuple[float, float]]:
    """Every t whose interpolated gap is below the gap at t = 1 (the pre-unlearned model).

    The sweep must end at t = 1. The interpolant (``kind``, :func:`interpolate_gap`) is
    evaluated on ``num_dense`` equally spaced points over ``[ts[0], 1]``; a point belongs to the
    region when its gap is below ``gaps[-1]`` by more than a round-off tolerance
    (1e-9 * max(1, |gaps[-1]|)). Returns the runs of such points as closed intervals
    ``(start, end)`` on the grid, in increasing t; ``[]`` if none.
    """
    ts, gaps = _check_sweep(ts, gaps)
    if ts[-1] != 1.0:
        raise ValueError(f"the sweep must end at t = 1, got last t = {ts[-1]}")
    if num_dense < 2:
        raise ValueError(f"num_dense must be at least 2, got {num_dense}")
    interpolant = _fit(ts, gaps, kind)
    grid = np.linspace(ts[0], 1.0, num_dense)
    ref = gaps[-1]
    below = interpolant(grid) < ref - 1e-9 * max(1.0, abs(ref))
    return _runs(grid, below)


def optimal_t(
    ts: ArrayLike,
    gaps: ArrayLike,
    lo: float = 0.75,
    hi: float = 1.0,
    num_dense: int = 1001,
    kind: str = "cubic",
) -> tuple[float, float]:
    """``(t_star, predicted_gap)``: the t in ``[lo, hi]`` minimising the interpolated gap
    (interpolant ``kind``, :func:`interpolate_gap`).

    Searched on ``num_dense`` equally spaced points of ``[lo, hi]`` (ties go to the smallest t);
    ``[lo, hi]`` must lie within the sweep's range so that nothing is extrapolated.
    """
    ts, gaps = _check_sweep(ts, gaps)
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    if lo < ts[0] or hi > ts[-1]:
        raise ValueError(f"[lo, hi] = [{lo}, {hi}] is outside the sweep [{ts[0]}, {ts[-1]}]")
    if num_dense < 2:
        raise ValueError(f"num_dense must be at least 2, got {num_dense}")
    grid = np.linspace(lo, hi, num_dense)
    values = _fit(ts, gaps, kind)(grid)
    i = int(np.argmin(values))
    return float(grid[i]), float(values[i])


def uniform_ts(n: int = 20) -> np.ndarray:
    """``n`` equally spaced points of [0, 1], both ends included (the paper's 20-point sweep)."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    return np.linspace(0.0, 1.0, n)
