"""The per-tensor parameter mask of MCU (paper section 2.3) and a random mask of equal budget.

A mask is a pytree of Python bools with the structure of the parameters: ``True`` marks a tensor
of the control point theta_c that curve training may change; all others stay frozen.

Budget rule (used by :func:`parameter_mask` and :func:`random_mask`): with ``N`` the total
number of elements, a fraction ``f`` gives the integer budget ``B = floor(f * N)``. Tensors are
visited in a fixed order and a tensor is taken *while the running element count before taking
it is below B*. So ``f = 0`` takes nothing, ``f = 1`` takes every visited tensor, and the count
taken ends in ``[B, B + size of the last tensor taken)`` unless the tensors run out first. This
is the rule of the authors' release (``generate_weight_mask.py``: ``int(N * k)`` and
``if count < threshold``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mcu_jax import checkpoint, checks, pytrees
from mcu_jax.data.batching import check_indices
from mcu_jax.data.device import Images
from mcu_jax.evaluation import mean_gradient
from mcu_jax.models import check_variables

PyTree = Any


def _take_in_order(order: Sequence[str], sizes: dict[str, int], budget: int) -> set[str]:
    """Paths taken from ``order`` while the running element count is below ``budget``."""
    taken: set[str] = set()
    count = 0
    for path in order:
        if count >= budget:
            break
        taken.add(path)
        count += sizes[path]
    return taken


def tensor_importance(grads: PyTree) -> PyTree:
    """Importance of each tensor: L2 norm of its gradient divided by its number of elements.

    Returns a pytree of Python floats (computed in float64 on the host); empty tensors get 0.
    """

    def importance(g: Any) -> float:
        g = np.asarray(g, dtype=np.float64)
        return float(np.linalg.norm(g.ravel()) / g.size) if g.size else 0.0

    return jax.tree_util.tree_map(importance, grads)


def parameter_mask(
    grads_retain: PyTree, grads_forget: PyTree, k: float = 0.5, k_r: float = 0.1
) -> PyTree:
    """MCU mask from the gradients at theta_o on D_r and on D_f (paper eqs. 3-5).

    1. Visit tensors in descending retain importance and *drop* them under the budget rule with
       fraction ``k_r`` (the tensors most important for D_r never move).
    2. Visit the remaining tensors in descending forget importance and *keep* them under the
       budget rule with fraction ``k``.

    Both ``k`` and ``k_r`` are fractions of the total number of elements (not of tensors); see
    the module docstring for the exact boundary. Ties in importance are broken by path string
    (ascending), so the result is deterministic. Unlike the release, a dropped tensor is never
    kept in step 2 (the paper's ``m = m_r & m_f``; the release re-enters dropped tensors with
    importance 0, which matters only when the remaining tensors cannot fill the k budget).
    Returns a pytree of Python bools shaped like ``grads_retain``.
    """
    k = checks.fraction("k", k)
    k_r = checks.fraction("k_r", k_r)
    pytrees.check_compatible(grads_retain=grads_retain, grads_forget=grads_forget)
    imp_r = pytrees.flatten(tensor_importance(grads_retain))
    imp_f = pytrees.flatten(tensor_importance(grads_forget))
    for name, imp in (("grads_retain", imp_r), ("grads_forget", imp_f)):
        for path, value in imp.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} has a non-finite gradient at leaf {path!r}")
    sizes = {p: math.prod(np.shape(g)) for p, g in pytrees.flatten(grads_retain).items()}
    total = sum(sizes.values())

    by_retain = sorted(sizes, key=lambda p: (-imp_r[p], p))
    dropped = _take_in_order(by_retain, sizes, math.floor(k_r * total))
    remaining = [p for p in sizes if p not in dropped]
    by_forget = sorted(remaining, key=lambda p: (-imp_f[p], p))
    kept = _take_in_order(by_forget, sizes, math.floor(k * total))
    return pytrees.unflatten(grads_retain, {p: p in kept for p in sizes})


def random_mask(params: PyTree, fraction: float, key: jax.Array) -> PyTree:
    """Keep whole tensors in a random order (from ``key``) under the budget rule.

    The element budget matches :func:`parameter_mask`'s ``k``, for the paper's Figure 2
    comparison. Deterministic for a given key and parameter structure.
    """
    fraction = checks.fraction("fraction", fraction)
    key = checks.key("key", key)
    sizes = {p: math.prod(np.shape(v)) for p, v in pytrees.flatten(params).items()}
    paths = sorted(sizes)
    perm = np.asarray(jax.random.permutation(key, len(paths))) if paths else []
    order = [paths[i] for i in perm]
    kept = _take_in_order(order, sizes, math.floor(fraction * sum(sizes.values())))
    return pytrees.unflatten(params, {p: p in kept for p in sizes})


def _kept_elements(mask: PyTree, params: PyTree) -> tuple[int, int, dict[str, bool]]:
    """(elements kept, elements in all, the flat mask) of ``params`` under ``mask``."""
    flat_mask = pytrees.flatten(mask)
    sizes = {p: math.prod(np.shape(v)) for p, v in pytrees.flatten(params).items()}
    if set(flat_mask) != set(sizes):
        raise ValueError("mask and params have different leaf paths")
    return sum(s for p, s in sizes.items() if flat_mask[p]), sum(sizes.values()), flat_mask


def trained_fraction(mask: PyTree, params: PyTree) -> float:
    """The share of ``params``' elements that ``mask`` trains (0 for no elements)."""
    kept, total, _ = _kept_elements(mask, params)
    return kept / total if total else 0.0


def mask_summary(mask: PyTree, params: PyTree) -> str:
    """One line: how many elements and tensors of ``params`` the mask keeps."""
    kept, total, flat_mask = _kept_elements(mask, params)
    n_kept = sum(bool(v) for v in flat_mask.values())
    frac_e = 100.0 * kept / total if total else 0.0
    frac_t = 100.0 * n_kept / len(flat_mask) if flat_mask else 0.0
    return (
        f"mask keeps {kept:,} of {total:,} elements ({frac_e:.2f}%) in "
        f"{n_kept} of {len(flat_mask)} tensors ({frac_t:.2f}%)"
    )


def save(mask: PyTree, path: str | os.PathLike) -> None:
    """Write ``mask`` as JSON: each tensor's path string -> true/false (an MCU run's
    ``mask.json``). Written atomically, so a crash leaves the old file or none."""
    checkpoint.write_json(Path(path), {p: bool(v) for p, v in pytrees.flatten(mask).items()})


def load(path: str | os.PathLike, params: PyTree) -> PyTree:
    """Read a mask written by :func:`save` (e.g. ``runs/.../mcu/mask.json``), shaped like
    ``params``. Refuses a file that is not JSON, of another model or with non-boolean
    values, naming the file (and the first offending tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mask file at {os.fspath(path)!r} (masks.save writes one; "
                                "every MCU run folder has mask.json)")
    flat = checkpoint.read_json(path, "not a mask written by masks.save (a JSON object of "
                                      "tensor path -> true/false)")
    for key, value in flat.items():
        if not isinstance(value, bool):
            raise ValueError(f"{path}: tensor {key!r} has {value!r}, expected true or false")
    try:
        return pytrees.unflatten(params, flat)
    except ValueError as e:
        raise ValueError(f"{path}: not a mask of these parameters: {e}") from None


def mask_gradients(
    model: Any,
    variables: PyTree,
    images: Images,
    retain_idx: Any,
    forget_idx: Any,
    batch_size: int = 256,
    mesh: Any = None,
    augment_key: Any = None,
) -> tuple[PyTree, PyTree]:
    """Gradients of the mean cross-entropy at theta_o over all of D_r and all of D_f.

    ``retain_idx``/``forget_idx`` index into ``images``. Both are
    ``evaluation.mean_gradient`` (evaluation-mode BatchNorm, exact batched sums), data
    parallel over ``mesh`` when one is given (``batch_size`` divisible by its device count).
    The images are taken as stored; with ``augment_key`` they get their training
    augmentation, as the release's loaders give it (D_r's batches from
    ``fold_in(augment_key, 0)``, D_f's from ``fold_in(augment_key, 1)``).
    Returns ``(grads_retain, grads_forget)`` shaped like ``variables["params"]``; variables
    of another model are refused first (a ValueError naming the first leaf that differs,
    not a Flax scope error from inside the gradient's trace).
    """
    check_variables(model, variables, images.x.shape[1:], "variables")
    if augment_key is not None:
        checks.key("augment_key", augment_key)
    n = images.num_examples
    retain_idx = check_indices("retain_idx", retain_idx, n, allow_empty=False)
    forget_idx = check_indices("forget_idx", forget_idx, n, allow_empty=False)
    keys = (None, None) if augment_key is None else (
        jax.random.fold_in(augment_key, 0), jax.random.fold_in(augment_key, 1))
    return (
        mean_gradient(model, variables, images, retain_idx, batch_size, mesh, keys[0]),
        mean_gradient(model, variables, images, forget_idx, batch_size, mesh, keys[1]),
    )
