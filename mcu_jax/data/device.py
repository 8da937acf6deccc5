"""Image sets resident on the accelerator, passed into jitted functions as pytrees.

Training and evaluation loops index these arrays with device-side index batches, so the
host never feeds data during a run. Images stay uint8 (4x smaller than float32) and are
normalised inside the compiled step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Images:
    """Images ``x`` (N, H, W, C) uint8 and labels ``y`` (N,) int32 on the device.

    ``mean``/``std`` (per channel, [0, 1] scale) and the augmentation kind are static
    fields, so they are baked into compiled steps rather than traced.
    """

    x: jax.Array
    y: jax.Array
    mean: tuple[float, ...] = struct.field(pytree_node=False)
    std: tuple[float, ...] = struct.field(pytree_node=False)
    augment: str = struct.field(pytree_node=False, default="none")

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @classmethod
    def from_arrays(cls, x, y, mean, std, augment="none", sharding=None) -> Images:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers (class ids), got {y.dtype}")
        put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
        return cls(
            x=put(x),
            y=put(y.astype(np.int32)),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            augment=augment,
        )

    @classmethod
    def from_dataset(cls, dataset, part: str = "train", sharding=None) -> Images:
        """The train or test part of a :class:`~mcu_jax.data.Dataset` on the device."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', got {part!r}")
        x = dataset.x_train if part == "train" else dataset.x_test
        y = dataset.y_train if part == "train" else dataset.y_test
        return cls.from_arrays(x, y, dataset.mean, dataset.std, dataset.augment, sharding)
