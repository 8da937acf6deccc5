"""Exact evaluation of one model on index sets of an image set (no augmentation; a mean
gradient may take the training augmentation on request).

Every index is seen exactly once: full batches run inside one ``lax.scan`` call and the
remainder in a second call of its own shape. Results are per-sample arrays (correct,
cross-entropy, probability of the true class) that callers reduce as they need: accuracy
in percent, mean loss, or the confidences the MIA metric uses.

With a ``mesh`` (``mcu_jax.sharding.make_mesh``) :func:`outputs` (hence :func:`accuracy` and
:func:`evaluate_sets`) and :func:`mean_gradient` are data parallel: the variables and the
image set are replicated on the mesh's devices, every batch of indices is split along its
batch axis, and the compiled programs return their results replicated, so every process can
read them. The results equal the single-device ones within float tolerance (a gradient's
summation order differs). ``mesh=None`` runs the single-device programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import sharding
from mcu_jax.data.batching import check_batch_size, check_indices
from mcu_jax.data.device import Images
from mcu_jax.data.transforms import normalize, prepare_batch


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


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1,))
def _add_batch_gradient(model, total, variables, images: Images, idx, weight, key=None):
    others = {k: v for k, v in variables.items() if k != "params"}
    # key None: the images as stored; a key: the images' training augmentation
    x = prepare_batch(key, images.x[idx], images.mean, images.std, images.augment,
                      train=key is not None)

    def summed_loss(params):
        logits = model.apply({"params": params, **others}, x, train=False)
        return jnp.sum(per_sample_outputs(logits, images.y[idx])["loss"] * weight)

    grads = jax.grad(summed_loss)(variables["params"])
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total, grads)


@functools.cache
def _mesh_programs(mesh):
    """:func:`_eval_chunk` and :func:`_add_batch_gradient` for one mesh: the same functions
    (and program names) as ``sharding.data_parallel`` programs, their outputs pinned to the
    replicated sharding (the donated gradient total stays replicated)."""
    return (sharding.data_parallel(_eval_chunk.__wrapped__, mesh, static_argnums=0),
            sharding.data_parallel(_add_batch_gradient.__wrapped__, mesh, static_argnums=0,
                                   donate_argnums=(1,)))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def outputs(model, variables, images: Images, indices, batch_size: int = 500,
            mesh=None) -> dict:
    """Per-sample outputs (numpy, in the order of ``indices``) in evaluation mode.

    With a ``mesh`` every batch is split over its devices, so ``batch_size`` is rounded up to
    a multiple of the device count (500 -> 504 on 8 devices; outputs are per sample, so the
    batch size changes no result), and the last, shorter batch is padded to a multiple of
    the device count with the last index, whose extra outputs are dropped.
    """
    indices = check_indices("indices", indices, images.num_examples)
    batch_size = check_batch_size("batch_size", batch_size)
    n = indices.shape[0]
    if n == 0:
        return {k: np.zeros((0,), np.float32) for k in ("correct", "loss", "prob")}
    if mesh is not None:
        return _outputs_on_mesh(model, variables, images, indices, batch_size, mesh)
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


def _outputs_on_mesh(model, variables, images: Images, indices: np.ndarray, batch_size: int,
                     mesh) -> dict:
    """:func:`outputs` split over ``mesh``: full batches in one call, the rest (padded to a
    multiple of the device count) in a second, both with replicated results."""
    devices = sharding.num_shards(mesh)
    n = indices.shape[0]
    batch_size = min(_round_up(batch_size, devices), _round_up(n, devices))
    full = (n // batch_size) * batch_size
    run, _ = _mesh_programs(mesh)
    variables, images = sharding.replicate((variables, images), mesh)
    split = sharding.batch_sharding(mesh, ndim=2)
    parts = []
    if full:
        batches = indices[:full].reshape(-1, batch_size)
        parts.append(run(model, variables, images, sharding.place(batches, split)))
    if full < n:
        rest = np.full(_round_up(n - full, devices), indices[-1], np.int32)
        rest[: n - full] = indices[full:]
        parts.append(run(model, variables, images, sharding.place(rest[None], split)))
    parts = jax.device_get(parts)
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def accuracy(model, variables, images: Images, indices, batch_size: int = 500,
             mesh=None) -> float:
    """Accuracy in percent on ``indices`` (NaN for an empty set); ``mesh`` as in
    :func:`outputs`."""
    return percent(outputs(model, variables, images, indices, batch_size, mesh)["correct"])


def percent(correct: np.ndarray) -> float:
    """Accuracy in percent of per-sample ``correct`` flags (NaN for an empty set)."""
    return float(100.0 * correct.mean()) if correct.size else float("nan")


def set_outputs(model, variables, sets: dict, batch_size: int = 500, mesh=None) -> dict:
    """:func:`outputs` for each ``name -> (images, indices)`` entry of ``sets``.

    With a ``mesh`` the variables and every distinct image set are replicated once for all
    entries (D_r, D_f and D_t share the training images), not once per entry.
    """
    if mesh is not None:
        variables = sharding.replicate(variables, mesh)
        placed = {}
        for images, _ in sets.values():
            placed.setdefault(id(images), (images, sharding.replicate(images, mesh)))
        sets = {name: (placed[id(images)][1], idx) for name, (images, idx) in sets.items()}
    return {name: outputs(model, variables, images, idx, batch_size, mesh)
            for name, (images, idx) in sets.items()}


def evaluate_sets(model, variables, sets: dict, batch_size: int = 500,
                  mesh=None) -> dict[str, float]:
    """Accuracy in percent for each ``name -> (images, indices)`` entry (NaN for an empty
    set); ``mesh`` as in :func:`set_outputs`."""
    outs = set_outputs(model, variables, sets, batch_size, mesh)
    return {name: percent(o["correct"]) for name, o in outs.items()}


def mean_gradient(model, variables, images: Images, indices, batch_size: int = 256,
                  mesh=None, augment_key: jax.Array | None = None):
    """Gradient of the mean cross-entropy over ``images[indices]`` w.r.t. the params, with
    evaluation-mode BatchNorm (samples independent, so the batched sum is exact).

    The images are used as stored, unless ``augment_key`` is given: then each one gets the
    set's training augmentation (``images.augment``, e.g. random crop and flip; nothing for
    "none"), batch ``i`` (of ``batch_size`` indices in the given order) drawn from
    ``jax.random.fold_in(augment_key, i)``, as a gradient over a training loader would be
    (the release's masks). The same key, indices and batch size give the same gradient.

    Every batch has ``batch_size`` rows (the last one padded, its padding weighted by 0), so
    one compiled step serves the whole set; the host loops over batches, because XLA's CPU
    backend runs convolution gradients inside a scan far slower. Float32 sums, returned in
    each parameter's dtype.

    With a ``mesh`` the gradient is data parallel: variables, images and the running total
    are replicated on its devices once, every batch of indices (and its weights) is split
    along the batch axis, and the compiled step all-reduces the batch gradient into the
    replicated total. ``batch_size`` must then be divisible by the number of devices
    (ValueError otherwise); a set smaller than one batch runs as one batch of its size
    rounded up to a multiple of the device count. The result equals the single-device one
    within float tolerance (summation order differs) and is replicated on the mesh.
    """
    idx = check_indices("indices", indices, images.num_examples, allow_empty=False)
    bs = check_batch_size("batch_size", batch_size)
    sharding.check_batch_size(bs, mesh, "mean_gradient: batch_size")
    params = variables["params"]
    if mesh is None:
        bs = min(bs, idx.size)
        step = _add_batch_gradient
        total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    else:
        bs = min(bs, _round_up(idx.size, sharding.num_shards(mesh)))
        _, step = _mesh_programs(mesh)
        total = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
        total, variables, images = sharding.replicate((total, variables, images), mesh)
        split = sharding.batch_sharding(mesh, ndim=1)
    for start in range(0, idx.size, bs):
        chunk = idx[start : start + bs]
        padded = np.zeros(bs, np.int32)
        padded[: chunk.size] = chunk
        weight = np.zeros(bs, np.float32)
        weight[: chunk.size] = 1.0
        if mesh is None:
            padded, weight = jnp.asarray(padded), jnp.asarray(weight)
        else:
            padded, weight = sharding.place((padded, weight), split)
        key = None if augment_key is None else jax.random.fold_in(augment_key, start // bs)
        total = step(model, total, variables, images, padded, weight, key)
    return jax.tree.map(lambda g, p: (g / idx.size).astype(p.dtype), total, params)
