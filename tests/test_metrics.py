"""Unlearning metrics, MIA-efficacy, aggregation over seeds and the paper's tables."""

import math

import numpy as np
import pytest

from mcu_jax import metrics

# ----------------------------------------------------------------------------- one model


def test_unlearning_metrics_random():
    out = metrics.unlearning_metrics({"forget": 89.46, "retain": 99.98, "test": 89.59})
    assert out == pytest.approx({"UA": 10.54, "RA": 99.98, "TA": 89.59})
    assert "UA_test" not in out


def test_unlearning_metrics_class_wise_ignores_other_sets():
    acc = {"forget": 0.0, "retain": 99.0, "test": 90.0, "test_forget": 2.5, "test_retain": 95.0}
    out = metrics.unlearning_metrics(acc)
    assert out == pytest.approx({"UA": 100.0, "RA": 99.0, "TA": 90.0, "UA_test": 97.5})


@pytest.mark.parametrize(
    "acc, match",
    [
        ({"forget": 10.0, "retain": 99.0}, "test"),
        ({"forget": 101.0, "retain": 99.0, "test": 90.0}, r"acc\['forget'\].*101"),
        ({"forget": 10.0, "retain": float("nan"), "test": 90.0}, r"acc\['retain'\]"),
        ({"forget": 10.0, "retain": 99.0, "test": "x"}, r"acc\['test'\]"),
        ([10.0, 99.0, 90.0], "dict"),
    ],
)
def test_unlearning_metrics_errors(acc, match):
    with pytest.raises(ValueError, match=match):
        metrics.unlearning_metrics(acc)


def _confidences(rng, center, n, spread=0.01):
    return np.clip(rng.normal(center, spread, n), 0.0, 1.0)


def test_mia_separable_members_and_non_members():
    rng = np.random.default_rng(0)
    retain = _confidences(rng, 0.99, 400, 0.005)
    test = _confidences(rng, 0.5, 100, 0.05)
    like_members = _confidences(rng, 0.99, 50, 0.005)
    like_non_members = _confidences(rng, 0.5, 50, 0.05)
    assert metrics.mia_efficacy(retain, test, like_members) == pytest.approx(0.0, abs=2.0)
    assert metrics.mia_efficacy(retain, test, like_non_members) == pytest.approx(100.0, abs=2.0)
    half = np.concatenate([like_members[:25], like_non_members[:25]])
    assert metrics.mia_efficacy(retain, test, half) == pytest.approx(50.0, abs=4.0)


def test_mia_is_seeded_and_subsamples_the_retain_set():
    rng = np.random.default_rng(1)
    # Overlapping distributions: the attack depends on which members are drawn.
    retain = rng.uniform(0.3, 1.0, 2000)
    test = rng.uniform(0.0, 0.8, 60)
    forget = rng.uniform(0.0, 1.0, 300)
    a = metrics.mia_efficacy(retain, test, forget, seed=3)
    assert a == metrics.mia_efficacy(retain, test, forget, seed=3)
    results = {metrics.mia_efficacy(retain, test, forget, seed=s) for s in range(6)}
    assert len(results) > 1  # a different draw of |D_t| members from D_r
    assert 0.0 <= a <= 100.0
    # D_r smaller than D_t: all of it, against as many non-members drawn with the seed.
    small = retain[:40]
    assert metrics.mia_efficacy(small, test, forget, seed=2) == metrics.mia_efficacy(
        small, test, forget, seed=2
    )
    assert len({metrics.mia_efficacy(small, test, forget, seed=s) for s in range(6)}) > 1


def test_mia_attack_is_trained_on_as_many_members_as_non_members(monkeypatch):
    """With D_r smaller than D_t (a data subset), an unbalanced attack on barely separable
    confidences calls all of D_f non-members (MIA 100 for every model); balanced it does not."""
    rng = np.random.default_rng(0)
    retain = _confidences(rng, 0.62, 450, 0.2)
    test = _confidences(rng, 0.58, 900, 0.2)
    forget = _confidences(rng, 0.62, 50, 0.2)
    fitted = []
    svc = metrics.SVC

    class Recording(svc):
        def fit(self, x, y):
            fitted.append(np.bincount(y.astype(int)))
            return super().fit(x, y)

    monkeypatch.setattr(metrics, "SVC", Recording)
    value = metrics.mia_efficacy(retain, test, forget)
    metrics.mia_efficacy(retain[:300], test[:200], forget)
    assert [list(c) for c in fitted] == [[450, 450], [200, 200]]
    assert 0.0 < value < 100.0


@pytest.mark.parametrize(
    "args, match",
    [
        (([], [0.5], [0.5]), "prob_retain is empty"),
        (([0.9], [[0.5]], [0.5]), "prob_test must be 1-D"),
        (([0.9], [0.5], [float("nan")]), "prob_forget has non-finite"),
        (([1.2], [0.5], [0.5]), r"prob_retain must hold probabilities in \[0, 1\]"),
        (([0.9], [-0.1], [0.5]), "prob_test must hold"),
    ],
)
def test_mia_errors(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.mia_efficacy(*args)


def test_avg_gap_against_rt():
    rt = {"UA": 10.54, "RA": 99.98, "TA": 89.59, "MIA": 18.41}
    m = {"UA": 10.29, "RA": 98.69, "TA": 89.11, "MIA": 16.45}
    assert metrics.avg_gap(m, rt) == pytest.approx((0.25 + 1.29 + 0.48 + 1.96) / 4)
    assert metrics.avg_gap(rt, rt) == 0.0
    assert metrics.avg_gap(m, rt, keys=["UA"]) == pytest.approx(0.25)


def test_avg_gap_uses_ua_test_only_when_both_have_it_and_ignores_extras():
    rt = {"UA": 100.0, "UA_test": 100.0, "RA": 99.98, "TA": 90.37, "MIA": 100.0, "rte_min": 5}
    m = {
        "UA": 18.53,
        "UA_test": 24.63,
        "RA": 99.94,
        "TA": 91.01,
        "MIA": 43.18,
        "rte_min": 1.0,
        "acc": {"forget": 81.47},
    }
    assert metrics.avg_gap(m, rt) == pytest.approx((81.47 + 75.37 + 0.04 + 0.64 + 56.82) / 5)
    no_mia = {k: v for k, v in m.items() if k not in ("MIA", "UA_test")}
    assert metrics.avg_gap(no_mia, rt) == pytest.approx((81.47 + 0.04 + 0.64) / 3)


def test_avg_gap_errors():
    with pytest.raises(ValueError, match="share none"):
        metrics.avg_gap({"x": 1.0}, {"UA": 1.0})
    with pytest.raises(ValueError, match="rt has no value for key 'MIA'"):
        metrics.avg_gap({"MIA": 1.0}, {"UA": 1.0}, keys=["MIA"])


def test_relative_reduction():
    assert metrics.relative_reduction(6.57, 3.37) == pytest.approx(100 * 3.2 / 6.57)
    assert metrics.relative_reduction(2.0, 3.0) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="gap_before"):
        metrics.relative_reduction(0.0, 1.0)
    with pytest.raises(ValueError, match="gap_after"):
        metrics.relative_reduction(1.0, float("nan"))


# ----------------------------------------------------------------------------- over seeds


def test_aggregate_population_std():
    out = metrics.aggregate([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == 2.5
    assert out["std"] == pytest.approx(math.sqrt(1.25))  # ddof = 0
    assert out["values"] == [1.0, 2.0, 3.0, 4.0]
    one = metrics.aggregate([7.5])
    assert one == {"mean": 7.5, "std": 0.0, "values": [7.5]}
    assert isinstance(metrics.aggregate(np.array([1, 2]))["mean"], float)


@pytest.mark.parametrize("values", [[], [1.0, "a"], [True], None, "12"])
def test_aggregate_errors(values):
    with pytest.raises(ValueError, match="values"):
        metrics.aggregate(values)


def _per_seed():
    return [
        {
            "RT": {"UA": 10.2, "RA": 99.97, "TA": 89.37, "MIA": 18.0, "rte_min": 100.0},
            "NegGrad+": {"UA": 7.0, "RA": 98.6, "TA": 89.2, "MIA": 11.7, "rte_min": 3.0},
            "MCU_beta-NegGrad+": {
                "UA": 10.05,
                "RA": 98.7,
                "TA": 89.1,
                "MIA": 16.0,
                "rte_min": 6.0,
                "t_star": 0.8,
                "region": [[0.5, 0.9]],
            },
        },
        {
            "RT": {"UA": 10.88, "RA": 99.99, "TA": 89.81, "MIA": 18.82, "rte_min": 110.0},
            "NegGrad+": {"UA": 7.06, "RA": 98.66, "TA": 89.32, "MIA": 11.72, "rte_min": 2.92},
            "MCU_beta-NegGrad+": {
                "UA": 10.53,
                "RA": 98.68,
                "TA": 89.12,
                "MIA": 16.9,
                "rte_min": 7.64,
                "t_star": 0.9,
                "region": [],
            },
            "GA": {"UA": 0.06, "RA": 99.97, "TA": 90.89, "MIA": 0.98},
        },
    ]


def test_rows_over_seeds():
    per_seed = _per_seed()
    rows = metrics.rows_over_seeds(per_seed)
    assert [r["method"] for r in rows] == ["RT", "NegGrad+", "MCU_beta-NegGrad+", "GA"]
    mcu = rows[2]
    assert mcu["UA"]["mean"] == pytest.approx(10.29)
    assert mcu["UA"]["std"] == pytest.approx(0.24)
    assert mcu["UA"]["values"] == [10.05, 10.53]
    assert mcu["t_star"] == {
        "mean": pytest.approx(0.85),
        "std": pytest.approx(0.05),
        "values": [0.8, 0.9],
    }
    assert mcu["region"] == [[[0.5, 0.9]], []]  # non-numeric: one entry per seed
    # avg_gap filled per seed against that seed's RT, then aggregated
    expected = [metrics.avg_gap(s["MCU_beta-NegGrad+"], s["RT"]) for s in per_seed]
    assert mcu["avg_gap"]["values"] == pytest.approx(expected)
    assert rows[0]["avg_gap"]["mean"] == 0.0
    assert rows[3]["UA"]["values"] == [0.06]  # only in the second seed
    assert "rte_min" not in rows[3]


def test_rows_over_seeds_keeps_given_avg_gap_and_combines_dicts():
    per_seed = [
        {"A": {"UA": 1.0, "avg_gap": 9.0, "acc": {"forget": 99.0}}},
        {"A": {"UA": 3.0, "avg_gap": 7.0, "acc": {"forget": 97.0}}},
    ]
    (row,) = metrics.rows_over_seeds(per_seed)
    assert row["avg_gap"]["mean"] == 8.0
    assert row["acc"]["forget"]["mean"] == 98.0
    # A given avg_gap is kept even when RT is there to compute one from.
    rt = {"UA": 5.0, "RA": 100.0, "TA": 90.0, "MIA": 10.0}
    per_seed = [{"RT": rt, "A": {"UA": 1.0, "RA": 100.0, "TA": 90.0, "MIA": 10.0,
                                 "avg_gap": 9.0}}]
    rows = {r["method"]: r for r in metrics.rows_over_seeds(per_seed, rt_name="RT")}
    assert metrics.avg_gap(per_seed[0]["A"], rt) == 1.0
    assert rows["A"]["avg_gap"]["mean"] == 9.0


@pytest.mark.parametrize("per_seed", [[], {"RT": {}}, [{"RT": 3.0}], [3]])
def test_rows_over_seeds_errors(per_seed):
    with pytest.raises(ValueError, match="per_seed"):
        metrics.rows_over_seeds(per_seed)


# ----------------------------------------------------------------------------- tables


def test_markdown_table_cells():
    rows = metrics.rows_over_seeds(_per_seed())
    table = metrics.markdown_table(rows, class_wise=False)
    lines = table.splitlines()
    assert lines[0] == "| Methods | UA | RA | TA | MIA | Avg. Gap | RTE |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert lines[2] == (
        "| RT | 10.54 ± 0.34 (0.00) | 99.98 ± 0.01 (0.00) | 89.59 ± 0.22 (0.00) "
        "| 18.41 ± 0.41 (0.00) | 0.00 | 105.00 |"
    )
    mcu = lines[4].split(" | ")
    assert mcu[0] == "| MCU_beta-NegGrad+"
    assert mcu[1] == "10.29 ± 0.24 (0.25)"
    assert mcu[2] == "98.69 ± 0.01 (1.29)"
    # Avg. Gap is the paper's: the mean of the bracketed gaps of the means (0.25, 1.29, ...),
    # not the mean of the per-seed gaps (which results.json keeps as "avg_gap").
    rows_ = metrics.rows_over_seeds(_per_seed())
    means = {k: rows_[2][k]["mean"] - rows_[0][k]["mean"] for k in ("UA", "RA", "TA", "MIA")}
    assert mcu[5] == f"{np.mean(np.abs(list(means.values()))):.2f}"
    per_seed = np.mean([metrics.avg_gap(s["MCU_beta-NegGrad+"], s["RT"]) for s in _per_seed()])
    assert per_seed >= float(mcu[5]) - 0.005
    assert mcu[6] == "6.82 |"
    ga = lines[5].split(" | ")
    assert ga[1] == "0.06 ± 0.00 (10.48)"
    assert ga[-1] == "– |"  # no RTE


def test_markdown_table_class_wise_and_missing_values():
    rows = [
        {
            "method": "RT",
            "UA": {"mean": 100.0, "std": 0.0},
            "UA_test": {"mean": 100.0, "std": 0.0},
            "RA": {"mean": 99.98, "std": 0.0},
            "TA": {"mean": 90.37, "std": 0.08},
        },
        {
            "method": "FT",
            "UA": {"mean": 18.53, "std": 1.65},
            "RA": {"mean": 99.94, "std": 0.02},
            "TA": {"mean": 91.01, "std": 0.1},
            "MIA": {"mean": 43.18, "std": 3.26},
        },
    ]
    lines = metrics.markdown_table(rows, class_wise=True).splitlines()
    assert lines[0] == "| Methods | UA | UA_test | RA | TA | MIA | Avg. Gap | RTE |"
    cells = lines[3].split(" | ")
    assert cells[1] == "18.53 ± 1.65 (81.47)"
    assert cells[2] == "–"  # FT has no UA_test
    assert cells[5] == "43.18 ± 3.26"  # RT has no MIA: no gap
    # no per-seed avg_gap: the mean of the gaps of the means over shared columns
    assert cells[6] == f"{(81.47 + 0.04 + 0.64) / 3:.2f}"
    no_rt = metrics.markdown_table(rows[1:], class_wise=False, rt_name=None).splitlines()
    assert no_rt[2].split(" | ")[1] == "18.53 ± 1.65"


def test_a_nan_mean_prints_a_dash_and_stays_out_of_the_gap():
    """A NaN mean (e.g. an empty set's accuracy) is shown as "–" and left out of Avg. Gap,
    as a missing value is."""
    rt = {"method": "RT", "UA": {"mean": 5.0, "std": 0.0}, "RA": {"mean": 99.0, "std": 0.0},
          "TA": {"mean": 90.0, "std": 0.0}}
    row = {"method": "X", "UA": {"mean": float("nan"), "std": 0.0},
           "RA": {"mean": 97.0, "std": 0.0}, "TA": {"mean": 86.0, "std": 0.0}}
    cells = metrics.markdown_table([rt, row], class_wise=False).splitlines()[3].split(" | ")
    assert cells[1] == "–"
    assert cells[5] == f"{(2.0 + 4.0) / 2:.2f}"


def test_markdown_table_errors():
    with pytest.raises(ValueError, match="rt_name 'RT' names no row"):
        metrics.markdown_table([{"method": "FT"}], class_wise=False)
    with pytest.raises(ValueError, match="rows"):
        metrics.markdown_table([], class_wise=False)
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        metrics.markdown_table([{"UA": 1.0}], class_wise=False)


def _row(name, ua, gap, rt_ua=10.54):
    """A row whose four gaps to ``_row("RT", rt_ua, 0.0)`` average ``gap``: UA as given,
    RA, TA and MIA offset equally by what the UA gap leaves."""
    offset = (4 * gap - abs(ua - rt_ua)) / 3
    assert offset >= 0, "gap too small for this UA"
    return {
        "method": name,
        "UA": {"mean": ua, "std": 0.0, "values": [ua]},
        "RA": {"mean": 90.0 - offset, "std": 0.0, "values": [90.0 - offset]},
        "TA": {"mean": 85.0 - offset, "std": 0.0, "values": [85.0 - offset]},
        "MIA": {"mean": 20.0 + offset, "std": 0.0, "values": [20.0 + offset]},
    }


def test_table1_layout_and_reduction():
    rows = [
        _row("RT", 10.54, 0.0),
        _row("FT", 0.42, 6.57),
        _row("GA", 0.06, 7.31),
        _row("MCU_beta-GA", 3.84, 3.45),
        _row("MCU-FT", 4.0, 5.0),  # fixed-beta MCU: not part of the pairs
        _row("MCU_beta-FT", 5.62, 3.37),
        _row("SalUn", 6.67, 5.99),  # no MCU_beta counterpart
    ]
    text = metrics.table1_markdown(rows)
    table, left_out, summary = text.split("\n\n")
    names = [line.split(" | ")[0][2:] for line in table.splitlines()[2:]]
    assert names == ["RT", "FT", "MCU_beta-FT", "GA", "MCU_beta-GA"]
    assert left_out == "Not in Table 1's layout (see the full table): MCU-FT, SalUn."
    assert "UA_test" not in table.splitlines()[0]
    expected = np.mean(
        [metrics.relative_reduction(6.57, 3.37), metrics.relative_reduction(7.31, 3.45)]
    )
    assert summary == (
        f"Mean relative Avg. Gap reduction by MCU_beta over 2 base method(s): {expected:.2f}%"
    )


def test_table1_paper_numbers():
    """The paper's Table 1 gaps give its stated mean reduction of 49.71%."""
    pairs = {
        "FT": (6.57, 3.37),
        "RL": (2.70, 1.46),
        "GA": (7.31, 3.45),
        "NegGrad+": (2.97, 1.00),
        "SalUn": (5.99, 3.68),
        "NegTV": (6.10, 3.30),
    }
    rows = [_row("RT", 10.54, 0.0)]
    for base, (before, after) in pairs.items():
        rows += [_row(base, 10.54, before), _row(f"MCU_beta-{base}", 10.54, after)]
    assert metrics.table1_markdown(rows).endswith("6 base method(s): 49.71%")


def test_table1_without_pairs_and_class_wise_detection():
    rows = [_row("RT", 100.0, 0.0, rt_ua=100.0), _row("FT", 18.0, 40.0, rt_ua=100.0)]
    rows[0]["UA_test"] = {"mean": 100.0, "std": 0.0}
    text = metrics.table1_markdown(rows)
    assert "| UA_test |" in text.splitlines()[0]
    assert text.splitlines()[-1].startswith("Mean relative Avg. Gap reduction by MCU_beta: –")


def _explicit_mia(retain, test, forget, seed):
    """SalUn's confidence attack written out: |D_t| members drawn from D_r (without
    replacement, numpy's generator from ``seed``; or, D_r being smaller, |D_r| non-members
    drawn from D_t), an RBF SVC with C = 3 and gamma "auto" (1 / n_features = 1 here), the
    share of D_f predicted non-member."""
    from sklearn.svm import SVC

    n = min(retain.size, test.size)
    if retain.size > n:
        retain = retain[np.random.default_rng(seed).choice(retain.size, n, replace=False)]
    if test.size > n:
        test = test[np.random.default_rng(seed).choice(test.size, n, replace=False)]
    x = np.concatenate([retain, test])[:, None]
    y = np.concatenate([np.ones(retain.size), np.zeros(test.size)])
    attack = SVC(C=3.0, kernel="rbf", gamma=1.0).fit(x, y)
    return 100.0 * np.mean(attack.predict(forget[:, None]) == 0)


@pytest.mark.parametrize("n_retain", [50, 400])  # |D_r| samples of D_t; |D_t| samples of D_r
def test_mia_efficacy_matches_an_explicit_svc(n_retain):
    rng = np.random.default_rng(0)
    retain = np.clip(rng.normal(0.7, 0.15, n_retain), 0, 1)  # overlapping distributions
    test = np.clip(rng.normal(0.5, 0.2, 80), 0, 1)
    forget = rng.uniform(0, 1, 500)
    want = _explicit_mia(retain, test, forget, seed=4)
    assert metrics.mia_efficacy(retain, test, forget, seed=4) == pytest.approx(want)
