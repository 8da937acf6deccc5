"""Tests for mcu_jax.selection on synthetic gap curves with known answers."""

import numpy as np
import pytest

from mcu_jax import selection


def test_uniform_ts():
    ts = selection.uniform_ts()
    assert ts.shape == (20,) and ts[0] == 0.0 and ts[-1] == 1.0
    np.testing.assert_allclose(np.diff(ts), 1 / 19)
    assert selection.uniform_ts(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_alignment_gap_scalars_and_arrays():
    g = selection.alignment_gap(95.0, 90.0, 88.0, ref_train=99.0, ref_val=89.0)
    assert isinstance(g, float)
    assert g == pytest.approx((4.0 + 1.0 + 1.0) / 3)
    g2 = selection.alignment_gap(95.0, 90.0, None, ref_train=99.0, ref_val=89.0, include_test=False)
    assert g2 == pytest.approx(2.5)
    # Class-wise: the forget reference is 0, the test term keeps ref_val.
    g3 = selection.alignment_gap(95.0, 10.0, 88.0, ref_train=99.0, ref_val=89.0, ref_forget=0.0)
    assert g3 == pytest.approx((4.0 + 10.0 + 1.0) / 3)
    acc_r = np.array([99.0, 97.0, 95.0])
    acc_f = np.array([99.0, 92.0, 85.0])
    acc_t = np.array([90.0, 89.0, 87.0])
    gaps = selection.alignment_gap(acc_r, acc_f, acc_t, ref_train=99.0, ref_val=89.0)
    assert isinstance(gaps, np.ndarray) and gaps.shape == (3,)
    np.testing.assert_allclose(gaps, [(0 + 10 + 1) / 3, (2 + 3 + 0) / 3, (4 + 4 + 2) / 3])
    with pytest.raises(ValueError, match="acc_test"):
        selection.alignment_gap(95.0, 90.0, None, ref_train=99.0, ref_val=89.0)


def test_interpolate_gap_passes_through_points_and_reproduces_cubics():
    ts = selection.uniform_ts(20)
    gaps = 3 * ts**3 - 2 * ts**2 + ts + 1
    f = selection.interpolate_gap(ts, gaps)
    np.testing.assert_allclose(f(ts), gaps, atol=1e-12)
    dense = np.linspace(0, 1, 333)
    np.testing.assert_allclose(f(dense), 3 * dense**3 - 2 * dense**2 + dense + 1, atol=1e-10)


def test_optimal_t_on_parabola():
    ts = selection.uniform_ts(20)
    gaps = (ts - 0.85) ** 2
    t_star, gap = selection.optimal_t(ts, gaps)
    assert t_star == pytest.approx(0.85, abs=1e-3)
    assert gap == pytest.approx(0.0, abs=1e-8)
    # The minimum outside [lo, hi] is clipped to the nearest end of the window.
    t2, _ = selection.optimal_t(ts, (ts - 0.5) ** 2)
    assert t2 == pytest.approx(0.75)
    t3, _ = selection.optimal_t(ts, (ts - 0.5) ** 2, lo=0.0, hi=1.0)
    assert t3 == pytest.approx(0.5, abs=1e-3)


def test_effective_region_known_polynomial():
    ts = selection.uniform_ts(20)
    # g(t) = (t - 0.3)(t - 0.6)(t - 1) + 1, so g(1) = 1 and g(t) < 1 exactly on [0, 0.3) and
    # (0.6, 1). A cubic is reproduced exactly by the spline; on the 1001-point grid (step
    # 0.001) the region is [0, 0.299] and [0.601, 0.999] (the roots themselves are not below).
    gaps = (ts - 0.3) * (ts - 0.6) * (ts - 1.0) + 1.0
    region = selection.effective_region(ts, gaps, num_dense=1001)
    assert len(region) == 2
    (a0, a1), (b0, b1) = region
    assert a0 == 0.0 and a1 == pytest.approx(0.299, abs=1e-9)
    assert b0 == pytest.approx(0.601, abs=1e-9) and b1 == pytest.approx(0.999, abs=1e-9)
    assert all(isinstance(v, float) for iv in region for v in iv)
    # A sweep starting later: the grid covers [ts[0], 1] only.
    region = selection.effective_region(ts[5:], gaps[5:], num_dense=101)
    assert region[0][0] == pytest.approx(ts[5]) and region[-1][1] < 1.0


def test_effective_region_empty_and_full():
    ts = selection.uniform_ts(20)
    assert selection.effective_region(ts, 5 - ts) == []  # decreasing: nothing below g(1)
    assert selection.effective_region(ts, np.full(20, 2.0)) == []  # flat: nothing strictly below
    region = selection.effective_region(ts, ts**2, num_dense=101)  # increasing
    assert region == [(0.0, pytest.approx(0.99))]


@pytest.mark.parametrize(
    "ts, match",
    [
        (np.array([0.0, 0.5, 1.0]), "at least 4"),
        (np.array([0.0, 0.5, 0.4, 1.0]), "strictly increasing"),
        (np.array([0.0, 0.3, 0.3, 1.0]), "strictly increasing"),
        (np.array([-0.1, 0.3, 0.6, 1.0]), r"\[0, 1\]"),
        (np.array([0.0, 0.3, 0.6, 1.2]), r"\[0, 1\]"),
        (np.zeros((2, 4)), "1-d"),
    ],
)
def test_bad_ts_rejected(ts, match):
    gaps = np.zeros(ts.shape)
    with pytest.raises(ValueError, match=match):
        selection.interpolate_gap(ts, gaps)
    with pytest.raises(ValueError, match=match):
        selection.optimal_t(ts, gaps)
    with pytest.raises(ValueError, match=match):
        selection.effective_region(ts, gaps)


def test_other_errors():
    ts = selection.uniform_ts(10)
    with pytest.raises(ValueError, match="shape of ts"):
        selection.interpolate_gap(ts, np.zeros(9))
    with pytest.raises(ValueError, match="end at t = 1"):
        selection.effective_region(ts[:-1], np.zeros(9))
    with pytest.raises(ValueError, match="lo"):
        selection.optimal_t(ts, np.zeros(10), lo=0.9, hi=0.8)
    with pytest.raises(ValueError, match="lo"):  # an empty interval too
        selection.optimal_t(ts, np.zeros(10), lo=0.8, hi=0.8)
    with pytest.raises(ValueError, match="outside the sweep"):
        selection.optimal_t(ts[:-1], np.zeros(9))
    with pytest.raises(ValueError, match="finite"):
        selection.interpolate_gap(ts, np.r_[np.zeros(9), np.nan])


def test_optimal_t_ties_go_to_the_smallest_t():
    """A flat gap ties every candidate: t* is the window's smallest t, as documented."""
    ts = selection.uniform_ts(20)
    t_star, gap = selection.optimal_t(ts, np.full(20, 3.0), lo=0.8, hi=1.0)
    assert t_star == pytest.approx(0.8) and gap == pytest.approx(3.0)


# The gap of a class-wise digits curve (MCU_beta on RL, seed 1): a steep drop as the class is
# forgotten, then a plateau at the gap of t = 1 with a one-image dip near the end.
DROP_THEN_PLATEAU = np.array(
    [34.2559, 34.2559, 32.378, 25.8052, 9.8427, 1.3054] + [1.0707] * 8 + [0.9226] * 5 + [1.0707])


def test_cubic_spline_overshoots_a_drop_and_a_plateau_pchip_does_not():
    """The paper's cubic spline swings below every measured gap after the drop, so it puts
    t* at t ~ 0.29 with a predicted gap no sample shows, and rings about the plateau into
    pieces of region; the shape-preserving interpolant stays within the samples: t* lies in
    the measured dip and the region is that dip alone."""
    ts = selection.uniform_ts(20)
    gaps = DROP_THEN_PLATEAU
    t_cubic, predicted_cubic = selection.optimal_t(ts, gaps, lo=0.0)
    assert predicted_cubic < gaps.min() - 0.2 and t_cubic < 0.35
    assert len(selection.effective_region(ts, gaps)) > 1
    t_pchip, predicted_pchip = selection.optimal_t(ts, gaps, lo=0.0, kind="pchip")
    assert predicted_pchip == pytest.approx(gaps.min())
    assert ts[13] <= t_pchip <= ts[18]
    [(start, end)] = selection.effective_region(ts, gaps, kind="pchip")
    assert ts[13] < start < ts[14] and ts[18] < end < ts[19]
    # Between samples the shape-preserving interpolant never leaves their range.
    dense = np.linspace(0, 1, 2001)
    values = selection.interpolate_gap(ts, gaps, "pchip")(dense)
    for a, b, lo, hi in zip(ts[:-1], ts[1:], gaps[:-1], gaps[1:], strict=True):
        inside = values[(dense >= a) & (dense <= b)]
        assert inside.min() >= min(lo, hi) - 1e-9 and inside.max() <= max(lo, hi) + 1e-9


def test_both_interpolants_pass_through_the_samples_and_unknown_kinds_are_refused():
    ts = selection.uniform_ts(20)
    gaps = np.cos(3 * ts) + ts
    for kind in selection.INTERPOLATIONS:
        np.testing.assert_allclose(selection.interpolate_gap(ts, gaps, kind)(ts), gaps,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="kind='linear'"):
        selection.interpolate_gap(ts, gaps, "linear")
