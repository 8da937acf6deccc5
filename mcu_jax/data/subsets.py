"""A smaller copy of a data set for quick runs: `subsample(dataset, train_size, test_size)`.

Researchers without a GPU (or debugging a pipeline) want CIFAR-10's images at a fraction of
its cost. `subsample` keeps ``train_size`` training and ``test_size`` test images, drawn per
class so that every class keeps its share (largest remainders decide the rounding), from its
own seed: the unlearning split is then drawn inside the subset as on the full set. The
normalisation statistics stay those of the full set (they are constants of the data set).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mcu_jax import checks
from mcu_jax.data.datasets import Dataset

__all__ = ["subsample"]


def _per_class_counts(labels: np.ndarray, num_classes: int, size: int) -> np.ndarray:
    """How many of each class a subset of ``size`` keeps: proportional, exact in total."""
    counts = np.bincount(labels, minlength=num_classes)
    exact = counts * size / len(labels)
    keep = np.floor(exact).astype(np.int64)
    # Hand the remaining images to the classes with the largest remainders (lower class first).
    order = np.lexsort((np.arange(num_classes), -(exact - keep)))
    keep[order[: size - int(keep.sum())]] += 1
    return keep


def _draw(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    counts = _per_class_counts(labels, num_classes, size)
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False)
        for c, n in enumerate(counts) if n
    ]
    return np.sort(np.concatenate(picked))


def _size(name: str, value: int | None, available: int, dataset: str) -> int | None:
    value = checks.optional_integer(f"subsample: {name}", value, low=1)
    if value is not None and value > available:
        raise ValueError(
            f"subsample: {name}={value} but {dataset!r} has {available} images there; expected "
            f"at most {available} (or None for all)"
        )
    return value


def subsample(dataset: Dataset, train_size: int | None = None, test_size: int | None = None,
              seed: int = 0) -> Dataset:
    """``dataset`` with ``train_size`` training and ``test_size`` test images (None keeps all).

    Images are drawn without replacement, per class in proportion to the class sizes, and kept
    in their original order; the same ``seed`` gives the same subset. Returns ``dataset``
    itself when nothing is dropped.
    """
    train_size = _size("train_size", train_size, dataset.num_train, dataset.name)
    test_size = _size("test_size", test_size, dataset.num_test, dataset.name)
    seed = checks.integer("subsample: seed", seed, low=0)
    if train_size in (None, dataset.num_train) and test_size in (None, dataset.num_test):
        return dataset
    rng_train, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    parts = {}
    for part, size, rng in (("train", train_size, rng_train), ("test", test_size, rng_test)):
        x, y = getattr(dataset, f"x_{part}"), getattr(dataset, f"y_{part}")
        if size is not None and size < len(y):
            keep = _draw(y, dataset.num_classes, size, rng)
            x, y = x[keep], y[keep]
        parts[f"x_{part}"], parts[f"y_{part}"] = x, y
    return dataclasses.replace(dataset, **parts)
