"""Index batches drawn on the device; the image arrays themselves stay on the accelerator.

A training loop puts the whole uint8 set on the device once (`to_device`), draws a
``(steps, batch_size)`` index matrix per epoch (`epoch_batches`) and gathers ``x[idx]`` inside
the jitted step, so no host-to-device copy happens per batch.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["epoch_batches", "eval_batches", "to_device"]


def to_device(x: np.ndarray | jax.Array, y: np.ndarray | jax.Array,
              sharding: jax.sharding.Sharding | None = None) -> tuple[jax.Array, jax.Array]:
    """Copy images ``x`` (kept in their dtype, normally uint8) and labels ``y`` (as int32) to
    the device, or lay them out with ``sharding`` when given."""
    if jnp.ndim(y) != 1 or jnp.shape(x)[:1] != jnp.shape(y):
        raise ValueError(f"to_device: x has shape {jnp.shape(x)} and y shape {jnp.shape(y)}; "
                         "expected y of shape (N,) with N = len(x)")
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"to_device: labels must be integers (class indices), got dtype "
                         f"{jnp.result_type(y)}")
    y = np.asarray(y, np.int32) if isinstance(y, np.ndarray) else jnp.asarray(y, jnp.int32)
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


def _check(fn: str, indices: jax.Array | np.ndarray, batch_size: int) -> jax.Array:
    if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1):
        raise ValueError(f"{fn}: batch_size={batch_size!r}; expected an int >= 1")
    if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] == 0:
        raise ValueError(f"{fn}: indices must be a non-empty 1-D array; got shape "
                         f"{jnp.shape(indices)}")
    return jnp.asarray(indices, jnp.int32)


def epoch_batches(key: jax.Array, indices: jax.Array | np.ndarray, batch_size: int,
                  drop_remainder: bool = True) -> jax.Array:
    """One epoch of shuffled index batches, int32 ``(steps, batch_size)``, drawn on the device.

    With ``drop_remainder`` (default) ``steps = len(indices) // batch_size`` and the
    ``len % batch_size`` leftover indices of this permutation are skipped (a different subset
    each epoch). Otherwise ``steps = ceil(len / batch_size)`` and the last batch is filled by
    wrapping around to the start of the same permutation, so a few samples appear twice in
    that epoch but every batch has the static shape. Jittable with static ``batch_size`` and
    ``drop_remainder``.
    """
    idx = _check("epoch_batches", indices, batch_size)
    n = idx.shape[0]
    if drop_remainder and n < batch_size:
        raise ValueError(f"epoch_batches: batch_size={batch_size} exceeds the {n} indices with "
                         "drop_remainder=True, which would give no batch")
    perm = jax.random.permutation(key, idx)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    take = jnp.arange(steps * batch_size) % n
    return perm[take].reshape(steps, batch_size)


def eval_batches(indices: jax.Array | np.ndarray, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Every index exactly once, in order: ``full`` int32 ``(len // batch_size, batch_size)``
    for a scanned/looped call with a static batch shape, and ``rest`` ``(len % batch_size,)``
    for one remainder call (skip it when empty)."""
    idx = _check("eval_batches", indices, batch_size)
    steps = idx.shape[0] // batch_size
    return idx[: steps * batch_size].reshape(steps, batch_size), idx[steps * batch_size :]


def check_indices(name: str, indices, n: int, allow_empty: bool = True) -> np.ndarray:
    """``indices`` as int32 after checking it is 1-D, integer and inside [0, n).

    JAX clamps out-of-range gathers silently, so every entry point that indexes images
    checks here first and names the argument.
    """
    idx = np.asarray(indices)
    if idx.size == 0:
        if not allow_empty:
            raise ValueError(f"{name} is empty")
        return np.zeros((0,), np.int32)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer index array, got {idx.dtype} {idx.shape}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(
            f"{name} has indices outside [0, {n}): min {idx.min()}, max {idx.max()}"
        )
    return idx.astype(np.int32)


def check_batch_size(name: str, batch_size) -> int:
    bad_type = isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
    if bad_type or batch_size < 1:
        raise ValueError(f"{name}={batch_size!r}; expected an int >= 1")
    return int(batch_size)
