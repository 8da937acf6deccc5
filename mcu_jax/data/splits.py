"""The unlearning splits of a data set, reproducible from one seed: `Split` and `make_split`.

Training set: D_f (``forget``), D_r (``retain`` = the rest) and the retain subset used for curve
training (``retain_subset``). Test set, split per class: D_v (``val``) and D_t (``test``); in
the class-wise scenario D_t is further split into D_tf (``test_forget``: the forgotten class)
and D_tr (``test_retain``: the other classes).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

__all__ = ["SCENARIOS", "Split", "make_split"]

SCENARIOS = ("random", "class")

_TRAIN_FIELDS = ("forget", "retain", "retain_subset")
_TEST_FIELDS = ("val", "test", "test_forget", "test_retain")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Sorted int64 index arrays into the training set (``forget``, ``retain``,
    ``retain_subset``) and the test set (``val``, ``test``, ``test_forget``, ``test_retain``),
    with the scenario, the forgotten class (None for random forgetting) and the seed.
    ``forget`` and ``retain`` are checked to be disjoint."""

    forget: np.ndarray
    retain: np.ndarray
    retain_subset: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_forget: np.ndarray
    test_retain: np.ndarray
    scenario: str
    forget_class: int | None
    seed: int

    def __post_init__(self) -> None:
        for field in _TRAIN_FIELDS + _TEST_FIELDS:
            a = getattr(self, field)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.int64:
                got = f"shape {a.shape}, dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a)
                raise ValueError(f"Split.{field} must be a 1-D int64 numpy array; got {got}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"Split.scenario={self.scenario!r}; expected one of {SCENARIOS}")
        # A sample in both D_r and D_f would be retained and forgotten at once: every retain
        # accuracy, BatchNorm pass and mask gradient over D_r would see forgotten samples.
        shared = np.intersect1d(self.retain, self.forget)
        if shared.size:
            raise ValueError(
                f"Split.retain and Split.forget share {shared.size} indices (e.g. {shared[0]}); "
                "D_r and D_f must be disjoint"
            )

    def sizes(self) -> dict[str, int]:
        """Number of indices of every part, by field name."""
        return {f: len(getattr(self, f)) for f in _TRAIN_FIELDS + _TEST_FIELDS}

    def summary(self) -> str:
        """All sizes on one line, e.g. for a log."""
        s = self.sizes()
        head = f"{self.scenario}" + (
            f" (class {self.forget_class})" if self.forget_class is not None else ""
        )
        text = (
            f"split {head}, seed {self.seed}: forget {s['forget']}, retain {s['retain']} "
            f"(subset {s['retain_subset']}), val {s['val']}, test {s['test']}"
        )
        if self.scenario == "class":
            text += f" (forget class {s['test_forget']}, other {s['test_retain']})"
        return text

    describe = summary

    def __repr__(self) -> str:
        return f"Split({self.summary()})"


def _round(x: float) -> int:
    """Nearest integer, halves rounded up (predictable, unlike Python's banker's rounding)."""
    return int(np.floor(x + 0.5))


def _check_ratio(name: str, value: Any, where: str, *, closed_right: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not (0.0 < v < 1.0 or (closed_right and v == 1.0)):
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{where}{name}={value!r}; expected a number in {interval}")


def check_request(scenario: str, forget_ratio: float, forget_class: int | None,
                  val_ratio: float, retain_ratio: float, seed: int,
                  where: str = "make_split") -> None:
    """ValueError (prefixed ``where: ``) for a split request that no data set can satisfy:
    an unknown scenario, a ratio outside its interval, a bad seed, a forget class that is
    not an int >= 0 or is given for random forgetting. :func:`make_split` also checks the
    class against the data; a config checks these when it is made."""
    where = f"{where}: " if where else ""
    if scenario not in SCENARIOS:
        raise ValueError(f"{where}scenario={scenario!r}; expected one of {SCENARIOS}")
    _check_ratio("forget_ratio", forget_ratio, where, closed_right=False)
    _check_ratio("val_ratio", val_ratio, where, closed_right=False)
    _check_ratio("retain_ratio", retain_ratio, where, closed_right=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{where}seed={seed!r}; expected an int >= 0")
    if forget_class is None:
        return
    if scenario == "random":
        raise ValueError(
            f"{where}forget_class={forget_class!r} given with scenario='random'; "
            "a forget class is only meaningful for scenario='class'"
        )
    if (isinstance(forget_class, bool) or not isinstance(forget_class, numbers.Integral)
            or forget_class < 0):
        raise ValueError(f"{where}forget_class={forget_class!r}; expected an int >= 0")


def _sorted_index(a: np.ndarray) -> np.ndarray:
    out = np.sort(np.asarray(a, dtype=np.int64))
    out.flags.writeable = False
    return out


def make_split(dataset: Any, scenario: str = "random", forget_ratio: float = 0.1,
               forget_class: int | None = None, val_ratio: float = 0.1,
               retain_ratio: float = 0.5, seed: int = 0) -> Split:
    """Draw the unlearning split of ``dataset`` (anything with ``y_train``, ``y_test`` and
    ``num_classes``) for ``scenario`` "random" or "class".

    - "random": ``forget`` is round(forget_ratio * N) training samples drawn without
      replacement; "class": ``forget`` is every training sample of ``forget_class`` (drawn with
      the seed among the classes present when None; ``forget_ratio`` is then unused).
      ``retain`` is the rest.
    - ``val`` holds round(val_ratio * n_c) test samples of each class c, ``test`` the rest;
      class-wise, ``test_forget``/``test_retain`` split ``test`` by the forgotten class (both
      empty for random forgetting).
    - ``retain_subset`` is round(retain_ratio * len(retain)) samples of ``retain``.

    Each part draws from its own child of ``np.random.SeedSequence(seed)``, so the same seed
    always gives the same split (and the same val/test split in both scenarios).
    """
    check_request(scenario, forget_ratio, forget_class, val_ratio, retain_ratio, seed)
    forget_ratio, val_ratio, retain_ratio = map(float, (forget_ratio, val_ratio, retain_ratio))
    seed = int(seed)
    num_classes = int(dataset.num_classes)
    y_train = np.asarray(dataset.y_train)
    y_test = np.asarray(dataset.y_test)
    n_train = len(y_train)
    if forget_class is not None:
        if not forget_class < num_classes:
            raise ValueError(
                f"make_split: forget_class={forget_class!r}; expected an int in "
                f"[0, {num_classes})"
            )
        forget_class = int(forget_class)

    rng_class, rng_forget, rng_val, rng_subset = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )

    # Training set: forget / retain.
    if scenario == "random":
        n_forget = _round(forget_ratio * n_train)
        if n_forget == 0 or n_forget >= n_train:
            raise ValueError(
                f"make_split: forget_ratio={forget_ratio} of {n_train} training samples gives "
                f"{n_forget} to forget; expected between 1 and {n_train - 1}"
            )
        forget = rng_forget.choice(n_train, size=n_forget, replace=False)
    else:
        if forget_class is None:
            present = np.flatnonzero(np.bincount(y_train, minlength=num_classes))
            forget_class = int(rng_class.choice(present))
        forget = np.flatnonzero(y_train == forget_class)
        if len(forget) == 0:
            raise ValueError(
                f"make_split: forget_class={forget_class} has no training samples; the forget "
                "set would be empty"
            )
        if len(forget) == n_train:
            raise ValueError(
                f"make_split: forget_class={forget_class} holds every training sample; the "
                "retain set would be empty"
            )
    is_forget = np.zeros(n_train, bool)
    is_forget[forget] = True
    retain = np.flatnonzero(~is_forget)

    # Retain subset for curve training.
    n_subset = _round(retain_ratio * len(retain))
    if n_subset == 0:
        raise ValueError(
            f"make_split: retain_ratio={retain_ratio} of {len(retain)} retain samples gives an "
            "empty retain subset"
        )
    retain_subset = rng_subset.choice(retain, size=n_subset, replace=False)

    # Test set: stratified val / test.
    val_parts = []
    for c in range(num_classes):
        members = np.flatnonzero(y_test == c)
        k = _round(val_ratio * len(members))
        if k:
            val_parts.append(rng_val.choice(members, size=k, replace=False))
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, np.int64)
    is_val = np.zeros(len(y_test), bool)
    is_val[val] = True
    test = np.flatnonzero(~is_val)
    if len(val) == 0 or len(test) == 0:
        raise ValueError(
            f"make_split: val_ratio={val_ratio} of {len(y_test)} test samples gives "
            f"{len(val)} validation and {len(test)} test samples; expected both non-empty"
        )
    if scenario == "class":
        in_class = y_test[test] == forget_class
        test_forget, test_retain = test[in_class], test[~in_class]
    else:
        test_forget = test_retain = np.zeros(0, np.int64)

    return Split(
        forget=_sorted_index(forget), retain=_sorted_index(retain),
        retain_subset=_sorted_index(retain_subset), val=_sorted_index(val),
        test=_sorted_index(test), test_forget=_sorted_index(test_forget),
        test_retain=_sorted_index(test_retain), scenario=scenario,
        forget_class=forget_class if scenario == "class" else None, seed=seed,
    )
