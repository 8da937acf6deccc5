"""Pytree helpers: compatibility checks that name the offending leaf, and path-keyed views.

Leaves are addressed by a path string such as ``"params/Conv_0/kernel"``: dict keys, attribute
names and sequence indices joined by ``/``. Flat dicts keyed this way are how parameters are
split into a trainable part (the masked tensors of theta_c) and a frozen part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any


def path_str(keypath: tuple) -> str:
    """Render a jax key path as ``"a/b/0/c"`` (dict keys, attribute names, indices)."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in pairs]


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _dtype(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def check_compatible(**trees: PyTree) -> None:
    """Raise ValueError unless all named trees have the same structure, leaf shapes and dtypes.

    The message names the first mismatching leaf by its path and the two trees compared, e.g.
    ``check_compatible(theta_o=a, theta_c=b)``. With fewer than two trees nothing is checked.
    """
    if len(trees) < 2:
        return
    names = list(trees)
    ref_name = names[0]
    ref = _leaves_with_paths(trees[ref_name])
    ref_def = jax.tree_util.tree_structure(trees[ref_name])
    ref_paths = [p for p, _ in ref]
    for name in names[1:]:
        other = _leaves_with_paths(trees[name])
        other_paths = [p for p, _ in other]
        if other_paths != ref_paths:
            other_set, ref_set = set(other_paths), set(ref_paths)
            # Index of the first position where the two path lists differ.
            i = next(
                (
                    j
                    for j, (rp, op) in enumerate(zip(ref_paths, other_paths, strict=False))
                    if rp != op
                ),
                min(len(ref_paths), len(other_paths)),
            )
            missing = next((p for p in ref_paths[i:] if p not in other_set), None)
            extra = next((p for p in other_paths[i:] if p not in ref_set), None)
            if missing is not None:
                detail = f"leaf {missing!r} of {ref_name} is missing from {name}"
            elif extra is not None:
                detail = f"leaf {extra!r} of {name} is missing from {ref_name}"
            else:
                first = ref_paths[i] if i < len(ref_paths) else other_paths[i]
                detail = f"leaves are in a different order from {first!r} on"
            raise ValueError(f"pytree structure mismatch between {ref_name} and {name}: {detail}")
        other_def = jax.tree_util.tree_structure(trees[name])
        if other_def != ref_def:
            raise ValueError(
                f"pytree structure mismatch between {ref_name} and {name}: same leaf paths but "
                f"different container types ({ref_def} vs {other_def})"
            )
        for (path, a), (_, b) in zip(ref, other, strict=True):
            if _shape(a) != _shape(b):
                raise ValueError(
                    f"shape mismatch at leaf {path!r}: {ref_name} has {_shape(a)}, "
                    f"{name} has {_shape(b)}"
                )
            if _dtype(a) != _dtype(b):
                raise ValueError(
                    f"dtype mismatch at leaf {path!r}: {ref_name} has {_dtype(a)}, "
                    f"{name} has {_dtype(b)}"
                )


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """One flag per leaf, in one compiled call (a model has hundreds of leaves)."""
    return jax.numpy.stack([jax.numpy.isfinite(leaf).all() for leaf in leaves])


def check_finite(name: str, tree: PyTree) -> None:
    """ValueError naming the first leaf of ``tree`` with a NaN or infinity (leaves that are
    not concrete numbers, such as tracers or shapes, are skipped). A curve multiplies every
    point by its weight, and 0 * NaN is NaN: one non-finite point spoils the whole curve,
    its ends included, so it is refused up front."""
    leaves = _leaves_with_paths(tree)
    flags: dict[str, bool] = {}
    on_device: dict[Any, list[tuple[str, Any]]] = {}  # one compiled check per device set
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            continue
        if isinstance(leaf, float | np.ndarray | np.generic):  # on the host: checked there
            host = np.asarray(leaf)
            if jax.numpy.issubdtype(host.dtype, jax.numpy.inexact):
                flags[path] = bool(np.isfinite(host).all())
        elif isinstance(leaf, jax.Array) and jax.numpy.issubdtype(leaf.dtype,
                                                                  jax.numpy.inexact):
            on_device.setdefault(frozenset(leaf.sharding.device_set), []).append((path, leaf))
    for group in on_device.values():
        ok = jax.device_get(_all_finite([leaf for _, leaf in group]))
        flags.update((path, bool(v)) for (path, _), v in zip(group, ok, strict=True))
    bad = next((path for path, _ in leaves if not flags.get(path, True)), None)
    if bad is not None:
        raise ValueError(f"{name}: leaf {bad} has a NaN or infinite value")


def flatten(tree: PyTree) -> dict[str, Any]:
    """Map each leaf's path string to the leaf (insertion order = jax flattening order)."""
    flat: dict[str, Any] = {}
    for path, leaf in _leaves_with_paths(tree):
        if path in flat:
            raise ValueError(f"two leaves share the path string {path!r}; cannot flatten by path")
        flat[path] = leaf
    return flat


def unflatten(template: PyTree, flat: Mapping[str, Any]) -> PyTree:
    """Rebuild a tree shaped like ``template`` taking each leaf from ``flat`` by its path."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [path_str(p) for p, _ in pairs]
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f"flat dict lacks leaf {missing[0]!r} of the template")
    extra = [p for p in flat if p not in set(paths)]
    if extra:
        raise ValueError(f"flat dict has leaf {extra[0]!r} that the template does not have")
    return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def tree_size(tree: PyTree) -> int:
    """Total number of array elements over all leaves."""
    return sum(math.prod(_shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def split_by_mask(tree: PyTree, mask: PyTree) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``tree`` into flat dicts ``(selected, rest)`` by a per-leaf boolean ``mask``.

    ``mask`` has the structure of ``tree`` with one bool per leaf. Both outputs are keyed by
    path string, so they are pytrees in their own right (e.g. to differentiate w.r.t. the
    selected leaves only); ``merge`` puts them back together.
    """
    flat_tree = flatten(tree)
    flat_mask = flatten(mask)
    if list(flat_mask) != list(flat_tree):
        check_compatible(
            tree=jax.tree_util.tree_map(lambda _: 0, tree),
            mask=jax.tree_util.tree_map(lambda _: 0, mask),
        )
        raise ValueError("mask and tree have different leaf paths")
    selected = {p: v for p, v in flat_tree.items() if bool(flat_mask[p])}
    rest = {p: v for p, v in flat_tree.items() if not bool(flat_mask[p])}
    return selected, rest


def merge(selected: Mapping[str, Any], rest: Mapping[str, Any], template: PyTree) -> PyTree:
    """Inverse of ``split_by_mask``: a tree shaped like ``template`` from both flat dicts."""
    overlap = set(selected) & set(rest)
    if overlap:
        raise ValueError(f"leaf {sorted(overlap)[0]!r} is in both selected and rest")
    return unflatten(template, {**selected, **rest})
