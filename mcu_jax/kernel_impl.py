"""What the library's Pallas kernels share: how a call picks the kernel or its XLA twin.

Each kernel (``models.pointwise``, ``combine``) has a plain twin in XLA ops that computes the
same up to float rounding, and takes ``impl``, one of :data:`IMPLS`: ``"auto"`` the kernel
where the program is compiled for an NVIDIA GPU (a card, or a deviceless compilation for
one) and the twin elsewhere; ``"pallas"`` the kernel (Triton backend: NVIDIA GPUs only);
``"interpret"`` the kernel interpreted by Pallas on any backend (tests); ``"xla"`` the twin.

"auto" picks as the program is traced where JAX's default device is an NVIDIA GPU
(:func:`default_device_is_nvidia`); elsewhere ``jax.lax.platform_dependent`` picks when it
is lowered (so a deviceless compilation for a GPU from a CPU host still gets the kernel).
``platform_dependent`` traces both branches, and under autodiff linearizes both, which
made a PreResNet-110 kernel step's trace 2.5 times as long (docs/benchmarks.md, "Building
the kernels' programs faster"). So on an NVIDIA machine a program with "auto" kernels is
traced for its GPU: to lower one for its CPU (CPU arrays, a CPU mesh, an export for
several platforms), trace it under ``jax.default_device`` of a CPU device.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
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
        if default_device_is_nvidia():
            return kernel(*args)
        return jax.lax.platform_dependent(*args, cuda=kernel, default=plain)
    return kernel(*args)


def default_device_is_nvidia() -> bool:
    """Whether JAX's default device (``jax.default_device``'s, else the default backend's
    first local one), for which programs are traced, is an NVIDIA GPU (:func:`is_nvidia`)."""
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        device = jax.local_devices(backend=device)[0]
    return is_nvidia(device)


def is_nvidia(device) -> bool:
    """Whether ``device`` (a ``jax.Device``) is an NVIDIA GPU: a GPU whose client names CUDA
    (a card) or NVIDIA (a deviceless target: its platform version is the card's name)."""
    if device.platform not in ("gpu", "cuda"):
        return False
    names = f"{device.client.platform_version} {device.device_kind}".lower()
    return "cuda" in names or "nvidia" in names


def pallas_call(kernel, *args, interpret: bool, num_warps: int, num_stages: int = 2,
                **options):
    """``pl.pallas_call(kernel, **options)(*args)``: with Triton's compiler parameters, or
    interpreted by Pallas."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only
    from jax.experimental.pallas import triton as pltriton

    skip_missing_dialect_modules()
    params = None if interpret else pltriton.CompilerParams(num_warps=num_warps,
                                                            num_stages=num_stages)
    return pl.pallas_call(kernel, compiler_params=params, interpret=interpret,
                          **options)(*args)


@functools.cache
def skip_missing_dialect_modules() -> tuple[str, ...]:
    """Marks the modules in which MLIR's Python bindings look for the Triton dialect ("tt")
    as absent where they do not exist, and returns their names.

    The bindings import ``<prefix>.tt`` for each of their search prefixes whenever they meet
    a Triton type or operation, and do not remember a failure: lowering a PreResNet-110
    kernel step made 66,000 failed imports, each a search of the file system, 1.3 s of the
    3.3 s its lowering took on 2 CPU cores. A ``sys.modules`` entry of None is Python's own
    mark for a module that does not exist: an import of it fails at once, as it failed
    before (:func:`mark_absent`). Nothing where the bindings cannot be read."""
    try:
        from jaxlib.mlir._mlir_libs import _mlir
        prefixes = tuple(_mlir.globals.dialect_search_modules)
    except (ImportError, AttributeError):
        return ()
    return mark_absent(f"{prefix}.tt" for prefix in prefixes)


def mark_absent(names) -> tuple[str, ...]:
    """Of ``names`` (full module names), those that no finder finds (their package missing,
    or they in it), each given a ``sys.modules`` entry of None, so that importing them
    fails at once with ModuleNotFoundError; a name already imported, or that exists, is left
    alone, and so is one whose package fails to import for another reason."""
    marked = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its package is missing
            found = False
        except Exception:  # noqa: BLE001 - a package that fails otherwise: left alone
            found = True
        if not found:
            sys.modules[name] = None
            marked.append(name)
    return tuple(marked)


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
