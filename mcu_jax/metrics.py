"""Unlearning metrics and the paper's result tables (every value in percent).

UA, RA, TA (and UA_test class-wise) come from accuracies; MIA-efficacy is the SalUn
"confidence" attack on true-class probabilities; the Avg. Gap is the mean absolute
difference from the retrained model RT (in the tables, of the means over seeds: the mean of
a row's bracketed gaps; ``results.json`` also keeps each seed's own ``avg_gap``). Results
over seeds are aggregated into rows ``{"method": name, metric: {"mean", "std", "values"},
...}`` and printed in the layout of the paper's Tables 1-3: ``mean ± std (|mean - RT mean|)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.svm import SVC

GAP_METRICS = ("UA", "UA_test", "RA", "TA", "MIA")
"""The metrics the Avg. Gap averages over (those present in both rows)."""

MCU_BETA_PREFIX = "MCU_beta-"
MISSING = "–"  # table cell of a metric a row does not have


# ---------------------------------------------------------------------------------------------
# Metrics of one model


def _percent(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (percent), got {value!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise ValueError(f"{name} must be a finite accuracy in [0, 100] percent, got {value}")
    return value


def unlearning_metrics(acc: Mapping[str, float]) -> dict[str, float]:
    """UA, RA, TA (and UA_test) in percent from accuracies on the unlearning sets.

    ``acc`` maps "forget" -> Acc(D_f), "retain" -> Acc(D_r), "test" -> Acc(D_t) and, for
    class-wise forgetting, "test_forget" -> Acc(D_tf), all in percent. Returns
    ``{"UA": 100 - Acc(D_f), "RA": Acc(D_r), "TA": Acc(D_t)}`` plus
    ``"UA_test": 100 - Acc(D_tf)`` when "test_forget" is given. Other keys are ignored.
    """
    if not isinstance(acc, Mapping):
        raise ValueError(f"acc must be a dict of accuracies, got {type(acc).__name__}")
    missing = [k for k in ("forget", "retain", "test") if k not in acc]
    if missing:
        raise ValueError(
            f"acc lacks {missing}; it needs 'forget', 'retain' and 'test' (got {sorted(acc)})"
        )
    result = {
        "UA": 100.0 - _percent("acc['forget']", acc["forget"]),
        "RA": _percent("acc['retain']", acc["retain"]),
        "TA": _percent("acc['test']", acc["test"]),
    }
    if acc.get("test_forget") is not None:
        result["UA_test"] = 100.0 - _percent("acc['test_forget']", acc["test_forget"])
    return result


def _probabilities(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one probability per sample), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got range [{array.min()}, {array.max()}]"
        )
    return array


def mia_efficacy(prob_retain: Any, prob_test: Any, prob_forget: Any, seed: int = 0) -> float:
    """MIA-efficacy in percent: the share of D_f that a membership attack calls non-member.

    The SalUn "confidence" attack: the only feature is the softmax probability of the true
    label (the caller computes it without augmentation). An RBF SVC (C = 3, gamma = "auto")
    is trained on members = |D_t| samples of D_r drawn without replacement with ``seed``,
    label 1, against non-members = D_t, label 0. When D_r is the smaller set (e.g. on a
    subset of the data) all of it is used against as many samples of D_t, drawn alike: an
    unbalanced attack would call every sample of D_f a non-member whenever the confidences
    barely differ. Higher is better forgetting: a retrained model treats D_f like unseen data.
    """
    retain = _probabilities("prob_retain", prob_retain)
    test = _probabilities("prob_test", prob_test)
    forget = _probabilities("prob_forget", prob_forget)
    rng = np.random.default_rng(seed)
    if retain.size > test.size:
        retain = retain[rng.choice(retain.size, size=test.size, replace=False)]
    elif test.size > retain.size:
        test = test[rng.choice(test.size, size=retain.size, replace=False)]
    features = np.concatenate([retain, test])[:, None]
    labels = np.concatenate([np.ones(retain.size), np.zeros(test.size)])
    attack = SVC(C=3.0, kernel="rbf", gamma="auto")
    attack.fit(features, labels)
    predicted = attack.predict(forget[:, None])
    return float(100.0 * np.mean(predicted == 0))


def _present(value: Any) -> bool:
    """A value a gap can use: not None and not NaN."""
    return value is not None and not (_is_number(value) and math.isnan(float(value)))


def avg_gap(
    metrics: Mapping[str, Any], rt: Mapping[str, Any], keys: Sequence[str] | None = None
) -> float:
    """Mean over ``keys`` of ``|metrics[k] - rt[k]|`` (the paper's Avg. Gap to RT).

    ``keys`` defaults to those of UA, UA_test, RA, TA, MIA present in both dicts, so
    class-wise rows (with UA_test) include it and rows without MIA leave it out.
    """
    if keys is None:
        keys = [k for k in GAP_METRICS if _present(metrics.get(k)) and _present(rt.get(k))]
        if not keys:
            raise ValueError(
                f"metrics {sorted(metrics)} and rt {sorted(rt)} share none of {GAP_METRICS}"
            )
    else:
        keys = list(keys)
        if not keys:
            raise ValueError("keys is empty")
        for k in keys:
            for name, d in (("metrics", metrics), ("rt", rt)):
                if not _present(d.get(k)):
                    raise ValueError(f"{name} has no value for key {k!r} (has {sorted(d)})")
    return float(np.mean([abs(float(metrics[k]) - float(rt[k])) for k in keys]))


def relative_reduction(gap_before: float, gap_after: float) -> float:
    """Percent by which the gap shrank: ``100 * (before - after) / before``."""
    before, after = float(gap_before), float(gap_after)
    if not (math.isfinite(before) and before > 0):
        raise ValueError(f"gap_before must be a finite positive gap, got {gap_before}")
    if not (math.isfinite(after) and after >= 0):
        raise ValueError(f"gap_after must be a finite non-negative gap, got {gap_after}")
    return 100.0 * (before - after) / before


# ---------------------------------------------------------------------------------------------
# Over seeds


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def aggregate(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` of per-seed values.

    The std is the population std (ddof = 0), so a single seed gives std 0 rather than NaN.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"values must be a list of numbers, got {values!r}")
    if len(values) == 0:
        raise ValueError("values is empty: nothing to aggregate")
    bad = [v for v in values if not _is_number(v)]
    if bad:
        raise ValueError(f"values must all be numbers, got {bad[0]!r}")
    floats = [float(v) for v in values]
    return {"mean": float(np.mean(floats)), "std": float(np.std(floats)), "values": floats}


def _combine(values: list[Any]) -> Any:
    """Numbers -> aggregate; dicts -> combined per key; anything else -> the list per seed."""
    if values and all(_is_number(v) for v in values):
        return aggregate(values)
    if values and all(isinstance(v, Mapping) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _combine([v[k] for v in values if k in v]) for k in keys}
    return list(values)


def rows_over_seeds(
    per_seed: Sequence[Mapping[str, Mapping[str, Any]]], rt_name: str | None = "RT"
) -> list[dict[str, Any]]:
    """One row per method (first-seen order) with every entry combined over seeds.

    ``per_seed[i]`` maps a method name to its metrics for seed i. Numeric entries (UA, RA,
    ..., "avg_gap", "rte_min", "t_star") become ``aggregate`` dicts over the seeds that have
    them; dicts are combined key by key; anything else (e.g. "region") becomes the list of
    per-seed values. When a seed has a row ``rt_name`` and a method lacks "avg_gap", the
    per-seed ``avg_gap`` to that seed's RT is filled in.
    """
    if isinstance(per_seed, Mapping) or not isinstance(per_seed, Sequence) or not per_seed:
        raise ValueError(f"per_seed must be a non-empty list of dicts, got {per_seed!r}")
    for i, seed_rows in enumerate(per_seed):
        if not isinstance(seed_rows, Mapping):
            raise ValueError(f"per_seed[{i}] must be a dict method -> metrics, got {seed_rows!r}")
        for method, m in seed_rows.items():
            if not isinstance(m, Mapping):
                raise ValueError(f"per_seed[{i}][{method!r}] must be a dict, got {m!r}")
    methods = list(dict.fromkeys(m for seed_rows in per_seed for m in seed_rows))
    rows = []
    for method in methods:
        entries = []
        for seed_rows in per_seed:
            if method not in seed_rows:
                continue
            entry = dict(seed_rows[method])
            rt = seed_rows.get(rt_name) if rt_name is not None else None
            if "avg_gap" not in entry and rt is not None:
                try:
                    entry["avg_gap"] = avg_gap(entry, rt)
                except ValueError:
                    pass  # no metric in common: leave the column empty
            entries.append(entry)
        row: dict[str, Any] = {"method": method}
        for key in dict.fromkeys(k for e in entries for k in e):
            if key == "method":
                continue
            row[key] = _combine([e[key] for e in entries if key in e])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Tables


def _mean(value: Any) -> float | None:
    """The mean of an aggregate dict (or a plain number); None when absent or NaN."""
    if isinstance(value, Mapping):
        value = value.get("mean")
    if not _is_number(value) or math.isnan(float(value)):
        return None
    return float(value)


def _std(value: Any) -> float:
    if isinstance(value, Mapping) and _is_number(value.get("std")):
        return float(value["std"])
    return 0.0


def _columns(class_wise: bool) -> list[str]:
    return ["UA", "UA_test", "RA", "TA", "MIA"] if class_wise else ["UA", "RA", "TA", "MIA"]


def _find_rt(rows: Sequence[Mapping[str, Any]], rt_name: str | None) -> Mapping | None:
    if rt_name is None:
        return None
    for row in rows:
        if row.get("method") == rt_name:
            return row
    names = [row.get("method") for row in rows]
    raise ValueError(
        f"rt_name {rt_name!r} names no row (methods: {names}); it is the reference of every "
        "gap (pass rt_name=None for a table without gaps)"
    )


def _row_avg_gap(row: Mapping, rt: Mapping | None, columns: Sequence[str]) -> float | None:
    """The paper's Avg. Gap: the mean over ``columns`` of the gaps of the means,
    ``|mean - RT mean|`` (the numbers in brackets of the row; the paper's Tables 1-3 are
    made so). Without an RT row, the row's own "avg_gap" (its mean over seeds) if any."""
    if rt is None:
        return _mean(row.get("avg_gap"))
    gaps = [
        abs(_mean(row.get(c)) - _mean(rt.get(c)))
        for c in columns
        if _mean(row.get(c)) is not None and _mean(rt.get(c)) is not None
    ]
    return float(np.mean(gaps)) if gaps else None


def table_avg_gap(rows: Sequence[Mapping[str, Any]], row: Mapping[str, Any], class_wise: bool,
                  rt_name: str | None = "RT") -> float | None:
    """The Avg. Gap that :func:`markdown_table` prints for ``row`` (one of ``rows``, as from
    ``rows_over_seeds``): the mean of its bracketed gaps to the RT row's means."""
    _check_rows(rows)
    return _row_avg_gap(row, _find_rt(rows, rt_name), _columns(class_wise))


def _check_rows(rows: Any) -> None:
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"rows must be a non-empty list of row dicts, got {rows!r}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "method" not in row:
            raise ValueError(f"rows[{i}] must be a dict with a 'method' name, got {row!r}")


def _cell(row: Mapping, rt: Mapping | None, column: str) -> str:
    mean = _mean(row.get(column))
    if mean is None:
        return MISSING
    text = f"{mean:.2f} ± {_std(row.get(column)):.2f}"
    rt_mean = _mean(rt.get(column)) if rt is not None else None
    if rt_mean is not None:
        text += f" ({abs(mean - rt_mean):.2f})"
    return text


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def markdown_table(
    rows: Sequence[Mapping[str, Any]], class_wise: bool, rt_name: str | None = "RT"
) -> str:
    """The paper's table: Methods | UA | (UA_test) | RA | TA | MIA | Avg. Gap | RTE.

    Rows as from ``rows_over_seeds``, printed in the given order. A metric cell reads
    ``mean ± std (|mean - RT mean|)`` with two decimals; Avg. Gap is the mean of the row's
    bracketed gaps (the gap of the means over seeds, as in the paper; a row's per-seed
    "avg_gap" in results.json is the mean of per-seed gaps, which is at least as large); RTE
    is the mean of "rte_min" in minutes. Missing values print as "–". ``rt_name=None`` omits
    the gaps (Avg. Gap then shows the row's own "avg_gap" if it has one).
    """
    _check_rows(rows)
    rt = _find_rt(rows, rt_name)
    columns = _columns(class_wise)
    header = ["Methods", *columns, "Avg. Gap", "RTE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["method"])]
        cells += [_cell(row, rt, c) for c in columns]
        cells.append(_number(_row_avg_gap(row, rt, columns)))
        cells.append(_number(_mean(row.get("rte_min"))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1_markdown(
    rows: Sequence[Mapping[str, Any]],
    class_wise: bool | None = None,
    rt_name: str = "RT",
    prefix: str = MCU_BETA_PREFIX,
) -> str:
    """The paper's Table 1: RT, then each base method followed by its ``MCU_beta-<base>`` row.

    A base is a row B for which ``prefix + B`` is also a row. The other rows (fixed-beta MCU,
    a method without an MCU_beta row) are not Table 1's: a line after the table names them.
    The last line gives the mean over bases of the relative Avg. Gap reduction
    (``relative_reduction(gap(B), gap(prefix + B))``, the paper's "reduced by 49.71%").
    ``class_wise=None`` adds the UA_test column when any row has it.
    """
    _check_rows(rows)
    rt = _find_rt(rows, rt_name)
    if class_wise is None:
        class_wise = any(_mean(row.get("UA_test")) is not None for row in rows)
    by_name = {row["method"]: row for row in rows}
    pairs = [
        (row, by_name[prefix + str(row["method"])])
        for row in rows
        if row is not rt and prefix + str(row["method"]) in by_name
    ]
    ordered = [rt]
    for base, derived in pairs:
        ordered += [base, derived]
    used = {id(r) for r in ordered}
    left_out = [str(row["method"]) for row in rows if id(row) not in used]
    table = markdown_table(ordered, class_wise=class_wise, rt_name=rt_name)
    if left_out:
        table += f"\n\nNot in Table 1's layout (see the full table): {', '.join(left_out)}."

    columns = _columns(class_wise)
    reductions = []
    for base, derived in pairs:
        before, after = _row_avg_gap(base, rt, columns), _row_avg_gap(derived, rt, columns)
        if before is not None and after is not None and before > 0:
            reductions.append(relative_reduction(before, after))
    if reductions:
        summary = (
            f"Mean relative Avg. Gap reduction by {prefix.rstrip('-')} over "
            f"{len(reductions)} base method(s): {np.mean(reductions):.2f}%"
        )
    else:
        summary = (
            f"Mean relative Avg. Gap reduction by {prefix.rstrip('-')}: {MISSING} "
            f"(no base method with a positive Avg. Gap has a {prefix}<base> row)"
        )
    return table + "\n\n" + summary
