"""SalUn: random labels restricted to the weights most salient for forgetting.

1. Saliency at theta_o: the gradient of the forget loss -CE, averaged over *all* of D_f with
   evaluation-mode BatchNorm (samples independent, so the batched sum is exact); data
   parallel under ``MethodData.mesh`` (``grad_batch_size`` divisible by its device count).
   The images are taken as stored, or with their training augmentation when
   ``saliency_augment`` is set (the release's loader; drawn from the method key).
2. Mask: the top ``fraction`` (default 0.5) of *all* parameter elements by |gradient|, as one
   boolean array per tensor. Exactly ``floor(fraction * N)`` elements are selected; ties at
   the threshold go to the elements first in flattening order.
3. RL (:mod:`mcu_jax.methods.rl`) trained with ``train.fit(..., update_mask=mask)``. The mask
   multiplies the *final* SGD update (after weight decay and momentum), so every masked-out
   weight stays bit-for-bit where it was. (SalUn's release masks the gradient before
   ``torch.optim.SGD``, whose weight decay still shrinks masked-out weights.) BatchNorm running
   statistics are not parameters and are updated by the train-mode passes as usual.

Paper (CIFAR-10): 10 epochs, lr 0.01. ``MethodResult.info["mask"]`` holds the mask.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import evaluation
from mcu_jax.data.device import Images
from mcu_jax.methods.base import MethodConfig, MethodData, MethodResult, finish, indices
from mcu_jax.methods.registry import register
from mcu_jax.methods.rl import train_random_labels


def forget_gradient(model, variables: dict, images: Images, forget, batch_size: int = 256,
                    mesh=None, augment_key: jax.Array | None = None):
    """Gradient of the forget loss -mean CE over ``images[forget]`` at ``variables``
    (evaluation-mode BatchNorm), shaped like the params, float32.

    It is ``-evaluation.mean_gradient`` (exact for any batch size), data parallel over
    ``mesh`` when given (``batch_size`` divisible by its device count), of the images'
    training augmentation when ``augment_key`` is given.
    """
    mean_ce = evaluation.mean_gradient(model, variables, images, forget, batch_size, mesh,
                                       augment_key)
    return jax.tree.map(lambda g: -g.astype(jnp.float32), mean_ce)


def saliency_mask(grads, fraction: float = 0.5):
    """Boolean arrays shaped like ``grads`` marking the top ``fraction`` of all elements by
    ``|grad|``: exactly ``floor(fraction * N)`` of the N elements; ties at the threshold are
    broken in favour of elements earlier in flattening order."""
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r}; expected a fraction in [0, 1]")
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    mags = [np.abs(np.asarray(g, dtype=np.float32)).ravel() for g in leaves]
    flat = np.concatenate(mags) if mags else np.zeros(0, np.float32)
    if not np.all(np.isfinite(flat)):
        raise ValueError("the saliency gradient has non-finite elements")
    total = flat.size
    k = math.floor(fraction * total)
    keep = np.zeros(total, dtype=bool)
    if k >= total:
        keep[:] = True
    elif k > 0:
        threshold = np.partition(flat, total - k)[total - k]  # the k-th largest value
        keep = flat > threshold
        ties = np.flatnonzero(flat == threshold)[: k - int(keep.sum())]
        keep[ties] = True
    out, start = [], 0
    for g, m in zip(leaves, mags, strict=True):
        out.append(keep[start:start + m.size].reshape(np.shape(g)))
        start += m.size
    return jax.tree_util.tree_unflatten(treedef, out)


def mask_fraction(mask) -> float:
    """Share of elements a boolean mask pytree selects."""
    leaves = [np.asarray(m) for m in jax.tree.leaves(mask)]
    total = sum(m.size for m in leaves)
    return float(sum(int(m.sum()) for m in leaves) / total) if total else 0.0


SALIENCY_STREAM = 0x5A1
"""``fold_in`` data of the saliency pass's augmentation key (``saliency_augment``)."""


@register("salun")
def salun(model, theta_o: dict, data: MethodData, config: MethodConfig, key: jax.Array,
          *, checkpoint_dir=None) -> MethodResult:
    """RL in which only the ``config.fraction`` most salient weights may change."""
    start = time.perf_counter()
    forget = indices(data, "forget", "salun")
    # The augmentation's own stream (fold_in), so the training's randomness is unchanged.
    augment_key = jax.random.fold_in(key, SALIENCY_STREAM) if config.saliency_augment else None
    grads = forget_gradient(model, theta_o, data.train, forget, config.grad_batch_size,
                            data.mesh, augment_key)
    mask = saliency_mask(grads, config.fraction)  # shaped like the params by construction
    device_mask = jax.tree.map(jnp.asarray, mask)
    variables, history = train_random_labels(
        model, theta_o, data, config, key, update_mask=device_mask,
        checkpoint_dir=checkpoint_dir, method="salun", desc="SalUn",
    )
    return finish(start, variables, history, mask=mask, mask_fraction=mask_fraction(mask))
