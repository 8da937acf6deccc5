"""Exact evaluation of one model on index sets of an image set (no augmentation).

Every index is seen exactly once: full batches run inside one ``lax.scan`` call and the
remainder in a second call of its own shape. Results are per-sample arrays (correct,
cross-entropy, probability of the true class) that callers reduce as they need: accuracy
in percent, mean loss, or the confidences the MIA metric uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax.data.batching import check_batch_size, check_indices
from mcu_jax.data.device import Images
from mcu_jax.data.transforms import normalize


def per_sample_outputs(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Correctness, cross-entropy and true-class probability for each row of ``logits``."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    logp_true = jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return {
        "correct": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        "loss": -logp_true,
        "prob": jnp.exp(logp_true),
    }


@functools.partial(jax.jit, static_argnums=0)
def _eval_chunk(model, variables, images: Images, batches):
    def body(_, idx):
        x = normalize(images.x[idx], images.mean, images.std)
        logits = model.apply(variables, x, train=False)
        return None, per_sample_outputs(logits, images.y[idx])

    _, out = jax.lax.scan(body, None, batches)
    return jax.tree.map(lambda a: a.reshape(-1), out)


def outputs(model, variables, images: Images, indices, batch_size: int = 500) -> dict:
    """Per-sample outputs (numpy, in the order of ``indices``) in evaluation mode."""
    indices = check_indices("indices", indices, images.num_examples)
    batch_size = check_batch_size("batch_size", batch_size)
    n = indices.shape[0]
    if n == 0:
        return {k: np.zeros((0,), np.float32) for k in ("correct", "loss", "prob")}
    batch_size = min(batch_size, n)
    full = (n // batch_size) * batch_size
    parts = []
    if full:
        batches = jnp.asarray(indices[:full].reshape(-1, batch_size))
        parts.append(_eval_chunk(model, variables, images, batches))
    if full < n:
        parts.append(_eval_chunk(model, variables, images, jnp.asarray(indices[None, full:])))
    parts = jax.device_get(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def accuracy(model, variables, images: Images, indices, batch_size: int = 500) -> float:
    """Accuracy in percent on ``indices`` (NaN for an empty set)."""
    correct = outputs(model, variables, images, indices, batch_size)["correct"]
    return float(100.0 * correct.mean()) if correct.size else float("nan")


def evaluate_sets(model, variables, sets: dict, batch_size: int = 500) -> dict[str, float]:
    """Accuracy in percent for each ``name -> (images, indices)`` entry."""
    return {
        name: accuracy(model, variables, images, idx, batch_size)
        for name, (images, idx) in sets.items()
    }
