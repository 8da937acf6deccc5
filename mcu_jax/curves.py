"""Curves in parameter space between two models: Bezier, Bernstein and polygonal chain.

Every curve is a pure function ``curve(points, t)`` of pytrees that returns the weighted sum
``sum_k w_k(t) * points[k]`` leaf by leaf, so it is differentiable in ``t`` and in every point
and works under ``jit`` and ``vmap``.

``t`` may be a Python float, a 0-d array, or a 1-d array of shape ``(T,)``; in the batched case
every output leaf gets a leading axis of size ``T`` (computed with ``vmap``). A concrete ``t``
outside ``[0, 1]`` raises ``ValueError``; a traced ``t`` cannot be checked and is not.

The weights are exactly 0 or 1 at ``t = 0`` and ``t = 1``, so the curve returns its first point
at ``t = 0`` and its last point at ``t = 1`` bit for bit (up to the sign of a zero), as long as
every point is finite (0 * NaN is NaN; ``pytrees.check_finite`` refuses such points). Each leaf's
weights are computed in the promoted dtype of ``t`` and the leaf and then cast to the leaf's
dtype, so the output dtype equals the input dtype; integer leaves are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import pytrees

PyTree = Any
WeightFn = Callable[[jax.Array, int], list[jax.Array]]


def _check_t(t: Any) -> jax.Array:
    """Validate a concrete ``t`` (range, rank) and return it as a float array."""
    if isinstance(t, jax.core.Tracer):
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or a 1-d batch, got shape {t.shape}")
        return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)
    arr = np.asarray(t)
    if arr.ndim > 1:
        raise ValueError(f"t must be a scalar or a 1-d batch, got shape {arr.shape}")
    real = jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
    if not real or arr.dtype == np.bool_:  # (numpy does not count bfloat16 as a number)
        raise ValueError(f"t must be a real number in [0, 1], got {t!r}")
    arr = arr.astype(np.float64)
    bad = ~((arr >= 0) & (arr <= 1))  # also catches NaN
    if np.any(bad):
        raise ValueError(f"t must lie in [0, 1], got {arr[bad].ravel()[0]!r}")
    out = jnp.asarray(t)
    return out if jnp.issubdtype(out.dtype, jnp.floating) else out.astype(jnp.float32)


def _check_points(points: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
    if len(points) < 2:
        raise ValueError(f"a curve needs at least 2 points, got {len(points)}")
    names = list(names) if names is not None else [f"points[{i}]" for i in range(len(points))]
    pytrees.check_compatible(**dict(zip(names, points, strict=True)))
    for path, leaf in pytrees.flatten(points[0]).items():
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(
                f"curve points must have floating-point leaves; leaf {path!r} of {names[0]} "
                f"has dtype {dtype}"
            )


def _weighted_sum(points: Sequence[PyTree], t: jax.Array, weight_fn: WeightFn) -> PyTree:
    """``sum_k w_k(t) points[k]`` for a scalar ``t``, weights cast per leaf dtype."""
    n = len(points)
    cache: dict[np.dtype, list[jax.Array]] = {}

    def weights_for(dtype: np.dtype) -> list[jax.Array]:
        if dtype not in cache:
            tt = t.astype(jnp.promote_types(t.dtype, dtype))
            cache[dtype] = [w.astype(dtype) for w in weight_fn(tt, n)]
        return cache[dtype]

    def combine(*leaves: jax.Array) -> jax.Array:
        leaves = [jnp.asarray(x) for x in leaves]
        return combination(weights_for(leaves[0].dtype), leaves)

    return jax.tree_util.tree_map(combine, *points)


def combination(weights: Sequence[jax.Array], leaves: Sequence[jax.Array]) -> jax.Array:
    """``weights[0] * leaves[0] + weights[1] * leaves[1] + ...``, summed in that order: the
    sum every curve forms for each leaf (and ``combine.weighted_sum`` for packed points)."""
    out = weights[0] * leaves[0]
    for w, x in zip(weights[1:], leaves[1:], strict=True):
        out = out + w * x
    return out


def _evaluate(points: Sequence[PyTree], t: Any, weight_fn: WeightFn) -> PyTree:
    t = _check_t(t)
    if t.ndim == 1:
        return jax.vmap(lambda s: _weighted_sum(points, s, weight_fn))(t)
    return _weighted_sum(points, t, weight_fn)


def _ipow(x: jax.Array, k: int) -> jax.Array:
    """``x**k`` for a non-negative int ``k`` with a finite derivative at ``x = 0``."""
    return jnp.ones_like(x) if k == 0 else x**k


def _bernstein_weights(t: jax.Array, n: int) -> list[jax.Array]:
    d = n - 1
    s = 1 - t
    return [math.comb(d, k) * _ipow(t, k) * _ipow(s, d - k) for k in range(n)]


def _polychain_weights(t: jax.Array, n: int) -> list[jax.Array]:
    # Segment i = floor(t (n-1)) (the last segment at t = 1), local coordinate s in [0, 1].
    # The derivative in t is the one-sided one at the ends and the right-hand one at knots.
    u = t * (n - 1)
    i = jnp.clip(jnp.floor(u), 0, n - 2)
    s = u - i
    zero = jnp.zeros_like(u)
    return [jnp.where(i == k, 1 - s, zero) + jnp.where(i == k - 1, s, zero) for k in range(n)]


def bernstein(points: Sequence[PyTree], t: Any) -> PyTree:
    """Bezier curve with any number (>= 2) of control points.

    ``phi(t) = sum_k binom(n-1, k) t^k (1-t)^(n-1-k) points[k]``; ``phi(0) = points[0]``,
    ``phi(1) = points[-1]``. See the module docstring for the accepted ``t``.
    """
    points = list(points)
    _check_points(points)
    return _evaluate(points, t, _bernstein_weights)


def bezier(theta_o: PyTree, theta_c: PyTree, theta_p: PyTree, t: Any) -> PyTree:
    """Quadratic Bezier curve of the paper (eq. 1).

    ``phi(t) = (1-t)^2 theta_o + 2(1-t)t theta_c + t^2 theta_p``: the original model at t = 0,
    the pre-unlearned model at t = 1, shaped by the control point ``theta_c``.
    """
    points = [theta_o, theta_c, theta_p]
    _check_points(points, ["theta_o", "theta_c", "theta_p"])
    return _evaluate(points, t, _bernstein_weights)


def polychain(points: Sequence[PyTree], t: Any) -> PyTree:
    """Polygonal chain through ``points`` at equally spaced knots ``k / (n-1)``.

    Linear between consecutive points; passes through ``points[k]`` at ``t = k/(n-1)`` (exactly
    at the ends, up to rounding of ``t * (n-1)`` at inner knots). At an inner knot the derivative in
    ``t`` is the right-hand one (the chain has a kink there).
    """
    points = list(points)
    _check_points(points)
    return _evaluate(points, t, _polychain_weights)


def midpoint(theta_o: PyTree, theta_p: PyTree) -> PyTree:
    """``(theta_o + theta_p) / 2``: the default control point, making the initial curve a line."""
    _check_points([theta_o, theta_p], ["theta_o", "theta_p"])
    return jax.tree_util.tree_map(
        lambda a, b: ((jnp.asarray(a) + jnp.asarray(b)) / 2).astype(jnp.result_type(a)),
        theta_o,
        theta_p,
    )


_CURVES = {"bezier": bezier, "bernstein": bernstein, "polychain": polychain}

#: Curves by name, for configs: :func:`curve_fn` and :func:`point` take any of them.
KINDS = tuple(_CURVES)


def curve_fn(kind: str) -> Callable[..., PyTree]:
    """The curve function named ``kind``: ``"bezier"``, ``"bernstein"`` or ``"polychain"``."""
    if kind not in _CURVES:
        raise ValueError(f"kind must be one of {sorted(_CURVES)}, got {kind!r}")
    return _CURVES[kind]


def point(kind: str, points: Sequence[PyTree], t: Any) -> PyTree:
    """theta(t) on the curve named ``kind`` through / controlled by ``points``: "bezier"
    (exactly 3 points: theta_o, theta_c, theta_p), "bernstein" or "polychain" (any number)."""
    fn = curve_fn(kind)
    if fn is bezier:
        if len(points) != 3:
            raise ValueError(f"a quadratic Bezier curve needs 3 points, got {len(points)} "
                             "(curves 'bernstein' and 'polychain' take any number from 2)")
        return bezier(*points, t)
    return fn(points, t)


_WEIGHTS = {"bezier": _bernstein_weights, "bernstein": _bernstein_weights,
            "polychain": _polychain_weights}


def weights(kind: str, t: Any, n: int = 3) -> list[jax.Array]:
    """The weights ``w_k(t)`` of the curve named ``kind`` through ``n`` points (``theta(t) =
    sum_k w_k(t) points[k]``, hence ``d theta(t) / d points[k] = w_k(t)``), for a scalar
    ``t``, in t's floating dtype."""
    curve_fn(kind)  # checks the name
    if kind == "bezier" and n != 3:
        raise ValueError(f"a quadratic Bezier curve has 3 points, got n={n}")
    if n < 2:
        raise ValueError(f"a curve needs at least 2 points, got n={n}")
    t = _check_t(t)
    if t.ndim:
        raise ValueError(f"weights: t must be a scalar, got shape {t.shape}")
    return _WEIGHTS[kind](t, n)
