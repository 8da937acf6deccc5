"""BatchNorm statistics recomputed for a given set of parameters (paper section 2.5).

A point theta(t) on a curve has no running statistics of its own, so they are measured
with one pass in train mode over a data set. The model is cloned with ``bn_momentum=0``,
which makes a train-mode call write exactly the current batch's mean and (biased)
variance; the per-batch statistics are then averaged with weights equal to the batch
sizes (the cumulative average that the release's ``utils.update_bn``, after Garipov et al.,
forms with momentum ``b / (n + b)``; ``torch.optim.swa_utils.update_bn`` weights every batch
alike, which differs only through a last, smaller batch), except that we average the biased
variances BatchNorm itself normalises with.

The batches take the set in a fixed shuffled order (:func:`bn_batches`, ``seed=0``; ``None``
keeps the given order), so a class-sorted set still gives mixed batches (our choice: the
release's ``eval_curve.py`` reads its training loader unshuffled). Each batch gets the
images' own training augmentation (``Images.augment``), drawn from a fixed key, as in the
training loader that the release's ``update_bn`` reads:
a model trained on padded random crops has running statistics of such images, and
statistics of clean images cost it accuracy (CIFAR-10, ResNet-20: theta_o's 70.3% on D_r
fell to 65.3% with clean statistics and stayed at 70.4% with augmented ones). Everything is
a pure function of ``params`` (the augmentation is the same for every point), so a sweep can
``vmap`` it over many t.

With a ``mesh`` (``mcu_jax.sharding.make_mesh``) :func:`recompute` is data parallel: every
batch is split over the mesh's devices and BatchNorm's batch mean and variance become
all-reduces, so each batch's statistics are those of the whole batch, as on one device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import sharding
from mcu_jax.data.batching import check_batch_size, check_indices, eval_batches
from mcu_jax.data.device import Images
from mcu_jax.data.transforms import prepare_batch

AUGMENT_KEY = jax.random.PRNGKey(0)
"""The key of the augmentation of BatchNorm passes (a constant: statistics are a pure
function of the parameters)."""


def bn_batches(indices, batch_size: int, n: int | None = None, seed: int | None = 0):
    """Full (S, B) index batches and the remainder (r,) covering ``indices`` once (None when
    there is no full batch or no remainder); ``n`` bounds the indices when given.

    The batches take the set in a fixed pseudo-random order (the sorted indices permuted
    by ``np.random.default_rng(seed)``; the release reads its loader unshuffled):
    averaged per-batch statistics depend on how the set is cut into batches, and a
    sorted D_r of a data set stored class by class (Tiny-ImageNet) would give batches of
    one class, whose variances miss the variance between classes. The same set and seed
    give the same batches. ``seed=None`` keeps the order of ``indices`` as given.
    """
    batch_size = check_batch_size("batch_size", batch_size)
    indices = np.asarray(indices)
    if n is not None:
        indices = check_indices("indices", indices, n)
    indices = indices.astype(np.int32)
    if indices.size == 0:
        raise ValueError("BatchNorm statistics need a non-empty data set")
    if seed is not None:
        indices = np.random.default_rng(seed).permutation(np.sort(indices))
    full, rest = eval_batches(indices, min(batch_size, indices.size))
    return (full if full.shape[0] else None), (rest if rest.shape[0] else None)


def group_layout(num_batches: int, group: int) -> tuple[int, int]:
    """``(steps, g)``: how :func:`batch_statistics` runs ``num_batches`` full batches with
    ``group`` at once: ``steps`` loop steps of ``g`` batches each, the fewest steps for
    ``group`` with the least padding (``steps * g - num_batches < steps`` copies)."""
    group = check_batch_size("group", group)
    steps = -(-num_batches // min(group, max(num_batches, 1)))
    return steps, -(-num_batches // max(steps, 1))


def describe_pass(n: int, batch_size: int, group: int = 1) -> str:
    """How the pass over ``n`` images runs, in words (for tables): e.g. "46 batches of 128 +
    112, 16 at once in 3 steps" (the remainder runs on its own) or "..., one at a time"."""
    b = min(check_batch_size("batch_size", batch_size), n)
    full, rest = divmod(n, b)
    steps, g = group_layout(full, group)
    text = f"{full} batch{'es' if full != 1 else ''} of {b}" + (f" + {rest}" if rest else "")
    if g < 2:
        return text + ", one at a time"
    return text + f", {g} at once in {steps} step{'s' if steps > 1 else ''}"


def batch_statistics(model, params, template, images: Images, batches, rest, group: int = 1):
    """Size-weighted mean of per-batch BatchNorm statistics (pure; jit/vmap friendly).

    ``template`` is any batch_stats pytree of the model (only its structure is used);
    ``batches``/``rest`` come from :func:`bn_batches`. ``group`` full batches run at once
    (:func:`group_layout`; ``vmap`` over them with the same parameters, each normalised with
    its own statistics and augmentation key, so the statistics are the same up to float
    rounding): larger, fewer kernels, and ``group`` times the activation memory. The batches
    are padded to whole groups by repeating the first one with weight zero. ``group=1``
    runs one batch after another. Returns a new batch_stats pytree.
    """
    group = check_batch_size("group", group)  # before anything else: a public entry point
    if not jax.tree.leaves(template):
        return template
    model0 = model.clone(bn_momentum=0.0)
    # One key per batch (the remainder last), the same for every params: the augmented
    # images do not depend on the point evaluated.
    keys = jax.random.split(AUGMENT_KEY, (0 if batches is None else batches.shape[0]) + 1)

    def stats(idx, key):
        x = prepare_batch(key, images.x[idx], images.mean, images.std, images.augment,
                          train=True)
        # A fixed dropout key: models with dropout (VGG-16-BN's classifier) need one in train
        # mode; it only touches layers after the BatchNorms in the built-in models.
        _, new = model0.apply(
            {"params": params, "batch_stats": template}, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
        return jax.tree.map(lambda v: v.astype(jnp.float32), new["batch_stats"])

    total = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), template)
    count = 0
    if batches is not None:
        s, b = batches.shape
        steps, g = group_layout(s, group)
        if g == 1:
            def body(acc, xs):
                return jax.tree.map(jnp.add, acc, stats(*xs)), None

            xs = (batches, keys[:-1])
        else:
            pad = steps * g - s

            def grouped(a):  # (s, ...) -> (steps, g, ...), padded with copies of a[0]
                a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))])
                return a.reshape(steps, g, *a.shape[1:])

            def body(acc, xs):
                idx, key, w = xs
                st = jax.vmap(stats)(idx, key)  # every leaf (g, ...)
                # Weighted by an elementwise product and a sum, not a dot (which a GPU
                # may run at reduced precision).
                return jax.tree.map(
                    lambda a, v: a + jnp.sum(w.reshape(g, *[1] * (v.ndim - 1)) * v, 0),
                    acc, st), None

            real = (jnp.arange(steps * g) < s).astype(jnp.float32).reshape(steps, g)
            xs = (grouped(batches), grouped(keys[:-1]), real)
        summed, _ = jax.lax.scan(body, total, xs)
        total = jax.tree.map(lambda a: a * b, summed)
        count += s * b
    if rest is not None:
        r = rest.shape[0]
        total = jax.tree.map(lambda a, v: a + r * v, total, stats(rest, keys[-1]))
        count += r
    return jax.tree.map(lambda a, t: (a / count).astype(t.dtype), total, template)


def recompute(model, variables: dict, images: Images, indices, batch_size: int = 128,
              mesh=None, seed: int | None = 0, group: int = 1) -> dict:
    """``variables`` with batch_stats recomputed over ``images[indices]`` (in the batches of
    :func:`bn_batches` with ``seed``; ``group`` of them at once, :func:`batch_statistics`).

    With a ``mesh`` the pass is data parallel (``group`` must be 1 and ``batch_size``
    divisible by the device count, ValueError otherwise; a set smaller than one batch, like
    the remainder, runs whole on every device); the statistics equal the single-device ones
    within float tolerance (the batch sums are reduced in another order) and come back
    replicated.
    """
    group = check_batch_size("group", group)
    batches, rest = bn_batches(indices, batch_size, images.num_examples, seed)
    params, template = variables["params"], variables["batch_stats"]
    if mesh is None:
        stats = _batch_statistics_jit(model, params, template, images, batches, rest, group)
        return {"params": params, "batch_stats": stats}
    if group > 1:  # vmap merges the groups into one batch that a mesh cannot split
        raise ValueError(f"group={group} with a mesh: the data-parallel pass runs one batch "
                         "at a time (group=1), its batches split over the devices")
    sharding.check_batch_size(batch_size, mesh, "BatchNorm recompute: batch_size")
    n = sharding.num_shards(mesh)
    params, template, images = sharding.replicate((params, template, images), mesh)

    def lay(rows, ndim):
        """Split along the batch axis when it divides evenly (always, for full batches of
        ``batch_size``); otherwise every device runs the batch whole (a set smaller than one
        batch, or the remainder)."""
        split = rows.shape[-1] % n == 0
        return sharding.place(rows, sharding.batch_sharding(mesh, ndim=ndim) if split
                              else sharding.replicated(mesh))

    if batches is not None:
        batches = lay(batches, 2)
    if rest is not None:
        rest = lay(rest, 1)
    stats = _mesh_program(mesh)(model, params, template, images, batches, rest, group)
    return {"params": params, "batch_stats": stats}


_batch_statistics_jit = jax.jit(batch_statistics, static_argnums=(0, 6))


@functools.cache
def _mesh_program(mesh):
    """:func:`batch_statistics` compiled with its result replicated on ``mesh``."""
    return sharding.data_parallel(batch_statistics, mesh, static_argnums=(0, 6))
