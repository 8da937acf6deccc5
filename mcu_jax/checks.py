"""Argument checks shared by the configs: each names the field and the value it refused.

They run in the configs' ``__post_init__`` so that a bad setting is refused when the config
is made, before any data is loaded or any program compiled. ``bool`` is never accepted as a
number (``True`` is an ``int`` to Python, but never what a user meant by a batch size).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def integer(name: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int (>= ``low`` when given); ValueError otherwise."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return int(value)


def optional_integer(name: str, value: Any, low: int | None = None) -> int | None:
    """None, or :func:`integer`."""
    return None if value is None else integer(name, value, low)


def number(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a finite float (> 0 with ``positive``); ValueError otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not math.isfinite(v) or (positive and v <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return v


def fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1]; ValueError otherwise (NaN, strings and bools too)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return v


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool; ValueError otherwise (``"yes"`` or 1 would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``; ValueError listing them otherwise."""
    if value not in tuple(options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def key(name: str, value: Any) -> Any:
    """``value`` if it is a JAX random key (``jax.random.PRNGKey(seed)``'s uint32 (2,) or a
    typed ``jax.random.key``); ValueError naming the field otherwise (an int seed in its place
    would fail deep inside jax)."""
    import jax  # the configs' checks above need no jax
    import jax.numpy as jnp

    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return value
    if shape == (2,) and dtype == jnp.uint32:
        return value
    raise ValueError(f"{name} must be a JAX random key (jax.random.PRNGKey(seed)), got "
                     f"{value!r}"[:300])
