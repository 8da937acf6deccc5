"""What the library's Pallas kernels share: how a call picks the kernel or its XLA twin.

Each kernel (``models.pointwise``, ``combine``) has a plain twin in XLA ops that computes the
same up to float rounding, and takes ``impl``, one of :data:`IMPLS`: ``"auto"`` the kernel
where the program is compiled for an NVIDIA GPU (a card, or a deviceless compilation for
one) and the twin elsewhere (``jax.lax.platform_dependent``: the choice follows the platform
the program is lowered for, not the default backend); ``"pallas"`` the kernel (Triton
backend: NVIDIA GPUs only); ``"interpret"`` the kernel interpreted by Pallas on any backend
(tests); ``"xla"`` the twin.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "interpret", "xla")


def check(name: str, impl: str) -> None:
    """ValueError, led by ``name``, unless ``impl`` is one of :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")


def check_explicit(name: str, impl: str) -> None:
    """ValueError, led by ``name``, unless ``impl`` is "xla", "pallas" or "interpret" (a
    choice already made: no "auto")."""
    if impl not in IMPLS[1:]:
        raise ValueError(f"{name}: impl must be 'xla', 'pallas' or 'interpret', got {impl!r}")


def dispatch(impl: str, kernel: Callable, plain: Callable, *args):
    """``plain(*args)`` for "xla"; for "auto" ``kernel(*args)`` where the program is
    compiled for an NVIDIA GPU and ``plain(*args)`` elsewhere (both must return the same
    structure); else ``kernel(*args)`` (which reads "interpret" from ``impl`` itself)."""
    if impl == "xla":
        return plain(*args)
    if impl == "auto":
        return jax.lax.platform_dependent(*args, cuda=kernel, default=plain)
    return kernel(*args)


def pallas_call(kernel, *args, interpret: bool, num_warps: int, num_stages: int = 2,
                **options):
    """``pl.pallas_call(kernel, **options)(*args)``: with Triton's compiler parameters, or
    interpreted by Pallas."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only
    from jax.experimental.pallas import triton as pltriton

    params = None if interpret else pltriton.CompilerParams(num_warps=num_warps,
                                                            num_stages=num_stages)
    return pl.pallas_call(kernel, compiler_params=params, interpret=interpret,
                          **options)(*args)


def dense(cotangent):
    """A symbolic zero cotangent as zeros; any other as it is."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(cotangent.shape, cotangent.dtype)
    return cotangent


def or_none(cotangent):
    """A symbolic zero cotangent as None; any other as it is."""
    return None if isinstance(cotangent, jax.custom_derivatives.SymbolicZero) else cotangent


def sums_or_none(cotangents) -> tuple:
    """A pair of cotangents (a kernel's sums, or its batch statistics; of a
    ``batchnorm.Sums``, its first two, the shares getting none) with symbolic zeros as None;
    ``(None, None)`` for None (no such output)."""
    if cotangents is None:
        return None, None
    return tuple(or_none(d) for d in tuple(cotangents)[:2])
