"""Many tensors as one vector per dtype, so that per-tensor work runs as one kernel.

A step that updates each tensor of a model on its own (an optimiser's update) launches a
kernel per tensor: for PreResNet-110 a few hundred tiny kernels per step on a GPU, where
each costs a launch however little it does (docs/benchmarks.md, "Fewer kernels: theta_c
packed"). Kept as
one vector per dtype, the tensors take one update kernel. Curve training keeps theta_c's
trained tensors so (``mcu.CurveState``).

A :class:`Layout` (static, hashable: a jit-time constant) records each tensor's path, shape
and dtype in order; :func:`pack` concatenates the tensors of a flat dict
(``pytrees.flatten``) into ``{key: (size,) vector}``, one per dtype, and :func:`unpack`
splits such vectors back. A key is the dtype's name and a fingerprint of the paths and
shapes packed in its vector (``"float32:1a2b3c4d"``), so a state packed for other tensors
(a checkpoint of curve training with another mask, even of the same size) does not fit
this layout's state. ``unpack`` uses ``jnp.split``, whose derivative is a concatenation, so the
gradient of packed tensors is packed with one copy, not one padded vector per tensor.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each tensor lies in its dtype's vector: ``paths``, ``shapes`` and ``dtypes``
    (names) in packing order."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, flat: dict) -> Layout:
        """The layout of a flat dict of arrays (or ShapeDtypeStructs), in its order; an empty
        dict gives an empty layout, which packs into no vector."""
        return cls(tuple(flat), tuple(tuple(np.shape(v)) for v in flat.values()),
                   tuple(np.dtype(v.dtype).name for v in flat.values()))

    def groups(self) -> dict[str, list[int]]:
        """Key of a packed vector (:func:`pack`) -> the indices of its tensors, in order."""
        indices: dict[str, list[int]] = {}
        for i, dtype in enumerate(self.dtypes):
            indices.setdefault(dtype, []).append(i)
        return {f"{dtype}:{self._fingerprint(members)}": members
                for dtype, members in indices.items()}

    def _fingerprint(self, indices: list[int]) -> str:
        text = ";".join(f"{self.paths[i]}{list(self.shapes[i])}" for i in indices)
        return f"{zlib.crc32(text.encode()):08x}"


def pack(layout: Layout, flat: dict) -> dict[str, jax.Array]:
    """``{key: the tensors of one dtype raveled and concatenated}`` (keys:
    ``Layout.groups``); ValueError when ``flat`` does not have the layout's paths, shapes and
    dtypes."""
    if set(flat) != set(layout.paths):
        missing = sorted(set(layout.paths) - set(flat))
        extra = sorted(set(flat) - set(layout.paths))
        raise ValueError(f"pack: the tensors do not match the layout; missing {missing[:3]}, "
                         f"not in it {extra[:3]}")
    for path, shape, dtype in zip(layout.paths, layout.shapes, layout.dtypes, strict=True):
        got = flat[path]
        if tuple(np.shape(got)) != shape or np.dtype(got.dtype).name != dtype:
            raise ValueError(f"pack: tensor {path!r} is {np.dtype(got.dtype).name} "
                             f"{tuple(np.shape(got))}, the layout says {dtype} {shape}")
    return {key: jnp.concatenate([jnp.ravel(flat[layout.paths[i]]) for i in indices])
            for key, indices in layout.groups().items()}


def sizes(layout: Layout, indices: list[int]) -> list[int]:
    """The number of elements of each of the layout's tensors at ``indices``."""
    return [math.prod(layout.shapes[i]) for i in indices]


def starts(counts: list[int]) -> list[int]:
    """Where each of ``counts`` consecutive runs starts: 0, counts[0], counts[0] +
    counts[1], ... (for :func:`sizes`, each tensor's offset in its packed vector)."""
    return np.cumsum([0, *counts[:-1]]).astype(int).tolist()


def check(layout: Layout, packed: dict[str, jax.Array], name: str = "unpack") -> None:
    """ValueError unless ``packed`` holds a vector of the right size and dtype for each of
    the layout's keys (:func:`pack`'s output for this layout); ``name`` leads the message."""
    for key, indices in layout.groups().items():
        if key not in packed:
            raise ValueError(f"{name}: no vector {key!r} (the layout's tensors of that dtype) "
                             f"among {sorted(packed)}: packed for other tensors?")
        vector, size = packed[key], sum(sizes(layout, indices))
        if vector.shape != (size,) or np.dtype(vector.dtype).name != key.split(":")[0]:
            raise ValueError(f"{name}: the vector {key!r} is {np.dtype(vector.dtype).name} "
                             f"{vector.shape}, the layout needs {key.split(':')[0]} ({size},)")


def unpack(layout: Layout, packed: dict[str, jax.Array]) -> dict:
    """The flat dict of tensors that :func:`pack` made ``packed`` from (in layout order)."""
    check(layout, packed)
    out = {}
    for key, indices in layout.groups().items():
        parts = jnp.split(packed[key], starts(sizes(layout, indices))[1:])
        out.update({layout.paths[i]: part.reshape(layout.shapes[i])
                    for i, part in zip(indices, parts, strict=True)})
    return {path: out[path] for path in layout.paths}
