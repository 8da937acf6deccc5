"""Argument checks shared by the configs: each names the field and the value it refused.

They run in the configs' ``__post_init__`` so that a bad setting is refused when the config
is made, before any data is loaded or any program compiled. ``bool`` is never accepted as a
number (``True`` is an ``int`` to Python, but never what a user meant by a batch size).
"""

from __future__ import annotations

import functools
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


def number(name: str, value: Any, *, positive: bool = False, low: float | None = None,
           below: float | None = None) -> float:
    """``value`` as a finite float (> 0 with ``positive``, >= ``low`` and < ``below`` when
    given); ValueError otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if (not math.isfinite(v) or (positive and v <= 0) or (low is not None and v < low)
            or (below is not None and v >= below)):
        if low is not None and below is not None:
            kind = f"a number in [{low:g}, {below:g})"
        elif low is not None:
            kind = f"a number >= {low:g}"
        elif below is not None:
            kind = f"a number < {below:g}"
        else:
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
    """``value`` if it is one JAX random key (``jax.random.PRNGKey(seed)``'s raw uint32 key,
    (2,) with the default implementation, or a typed ``jax.random.key``); ValueError naming
    the field otherwise (an int seed in its place would fail deep inside jax)."""
    import jax  # the configs' checks above need no jax
    import jax.numpy as jnp

    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return value
    if (shape, dtype) == _raw_key():
        return value
    raise ValueError(f"{name} must be a JAX random key (jax.random.PRNGKey(seed)), got "
                     f"{value!r}"[:300])


@functools.cache
def _raw_key() -> tuple:
    """(shape, dtype) of the default implementation's raw key, traced once (not per check)."""
    import jax

    raw = jax.eval_shape(jax.random.PRNGKey, 0)
    return raw.shape, raw.dtype


#: Seeds of ``jax.random.PRNGKey`` are taken modulo 2**32 (without 64-bit mode): 2**32 gives
#: the key of 0, so larger seeds are refused rather than silently repeating smaller ones.
SEED_LIMIT = 2 ** 32


def seed(name: str, value: Any) -> int:
    """``value`` if it is an int seed in [0, 2**32) (:data:`SEED_LIMIT`); ValueError else."""
    value = integer(name, value, 0)
    if value >= SEED_LIMIT:
        raise ValueError(f"{name} must be below 2**32 (a seed of jax.random.PRNGKey; larger "
                         f"ones repeat smaller ones' keys), got {value}")
    return value


def known_fields(where: str, cls: type, names) -> None:
    """ValueError naming those of ``names`` that are no field of the dataclass ``cls`` and
    listing its fields (a misspelt keyword would otherwise be a TypeError without them)."""
    import dataclasses

    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"{cls.__name__}'s fields are {', '.join(fields)}")
