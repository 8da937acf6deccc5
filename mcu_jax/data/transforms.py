"""Normalisation and on-device augmentation of uint8 NHWC batches, as pure jittable JAX.

A training step calls ``prepare_batch(key, x, mean, std, kind, train=True)``: augment the raw
uint8 images (crop with zero padding, as torchvision's ``RandomCrop(padding=4)`` does before
``ToTensor``/``Normalize``), then convert to float and normalise. ``kind`` and ``train`` are
Python values (static under ``jax.jit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mcu_jax.data.datasets import AUGMENTS

__all__ = ["AUGMENTS", "augment", "normalize", "prepare_batch"]


def _check_images(x: jax.Array, fn: str) -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(f"{fn}: x must be a batch of images of shape (B, H, W, C); got shape "
                         f"{jnp.shape(x)}")


def normalize(x: jax.Array, mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array,
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel (last axis) for uint8 images ``x``; computed in
    float32 and returned as ``dtype`` (e.g. bfloat16 for mixed precision)."""
    if jnp.result_type(x) != jnp.uint8:
        raise ValueError(f"normalize: x must be uint8 raw images; got dtype {jnp.result_type(x)} "
                         "(already normalised?)")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    channels = jnp.shape(x)[-1] if jnp.ndim(x) else None
    for name, v in (("mean", mean), ("std", std)):
        if v.ndim != 1 or v.shape[0] != channels:
            raise ValueError(f"normalize: {name} has shape {v.shape}; expected ({channels},), "
                             "one value per channel of x")
    y = (x.astype(jnp.float32) * (1.0 / 255.0) - mean) / std
    return y.astype(dtype)


def augment(key: jax.Array, x: jax.Array, kind: str, padding: int = 4) -> jax.Array:
    """Augment a batch ``x`` (B, H, W, C) with explicit randomness from ``key``.

    ``kind="none"`` returns ``x`` unchanged; ``"crop_flip"`` takes, per sample, a random
    H x W crop of the image zero-padded by ``padding`` pixels on each side, then flips it
    horizontally with probability 1/2. Dtype and shape are kept; apply to raw uint8 images,
    before `normalize`, so the padding is black as in torchvision.
    """
    if kind not in AUGMENTS:
        raise ValueError(f"augment: kind={kind!r}; expected one of {AUGMENTS}")
    _check_images(x, "augment")
    if kind == "none":
        return x
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"augment: padding={padding!r}; expected an int >= 0")
    b, h, w, c = x.shape
    key_crop, key_flip = jax.random.split(key)
    offsets = jax.random.randint(key_crop, (b, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(key_flip, 0.5, (b,))
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop(img: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (offset[0], offset[1], 0), (h, w, c))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def prepare_batch(key: jax.Array | None, x: jax.Array, mean: Sequence[float] | jax.Array,
                  std: Sequence[float] | jax.Array, kind: str, train: bool,
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Model input from raw uint8 images: `augment` (only when ``train``; ``key`` may be None
    otherwise), then `normalize` to ``dtype``."""
    if kind not in AUGMENTS:
        raise ValueError(f"prepare_batch: kind={kind!r}; expected one of {AUGMENTS}")
    if train and kind != "none":
        if key is None:
            raise ValueError(f"prepare_batch: key=None with train=True and kind={kind!r}; a "
                             "PRNG key is needed to augment")
        x = augment(key, x, kind)
    return normalize(x, mean, std, dtype)
