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


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1,))
def _add_batch_gradient(model, total, variables, images: Images, idx, weight):
    others = {k: v for k, v in variables.items() if k != "params"}
    x = normalize(images.x[idx], images.mean, images.std)

    def summed_loss(params):
        logits = model.apply({"params": params, **others}, x, train=False)
        return jnp.sum(per_sample_outputs(logits, images.y[idx])["loss"] * weight)

    grads = jax.grad(summed_loss)(variables["params"])
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total, grads)


def mean_gradient(model, variables, images: Images, indices, batch_size: int = 256):
    """Gradient of the mean cross-entropy over ``images[indices]`` w.r.t. the params, with
    evaluation-mode BatchNorm (samples independent, so the batched sum is exact).

    Every batch has ``batch_size`` rows (the last one padded, its padding weighted by 0), so
    one compiled step serves the whole set; the host loops over batches, because XLA's CPU
    backend runs convolution gradients inside a scan far slower. Float32 sums, returned in
    each parameter's dtype.
    """
    idx = check_indices("indices", indices, images.num_examples, allow_empty=False)
    bs = min(check_batch_size("batch_size", batch_size), idx.size)
    params = variables["params"]
    total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    for start in range(0, idx.size, bs):
        chunk = idx[start : start + bs]
        padded = np.zeros(bs, np.int32)
        padded[: chunk.size] = chunk
        weight = np.zeros(bs, np.float32)
        weight[: chunk.size] = 1.0
        total = _add_batch_gradient(
            model, total, variables, images, jnp.asarray(padded), jnp.asarray(weight)
        )
    return jax.tree.map(lambda g, p: (g / idx.size).astype(p.dtype), total, params)
