"""Many points t of a curve evaluated in one compiled call (paper section 2.5).

For every t: form theta(t) from the curve's points, recompute its BatchNorm statistics with
one train-mode pass over a chosen set (default D_r), then evaluate it in evaluation mode on
named sets (D_r, D_f, D_t, and D_tf class-wise), optionally keeping per-sample true-class
probabilities for the MIA metric. All t of a chunk run together under ``jax.vmap`` (or one
after another under ``lax.map``, which XLA's CPU backend runs much faster for convolutions
whose weights differ per t); batches run under ``lax.scan``.

With a ``mesh`` (``mcu_jax.sharding.make_mesh``) the sweep is t parallel: every chunk of t is
split over the mesh's devices with ``shard_map`` (the chunk padded to a multiple of the device
count), each device evaluates its own t (under vmap or lax.map, as the strategy says) on the
replicated data, and the results are gathered; they equal the single-device sweep.

``return_stats=True`` also returns every t's recomputed BatchNorm statistics, so one call
both measures theta(t) and yields the variables to export (``pipeline.run_mcu`` materialises
t* that way: one compiled program instead of a BatchNorm pass and an evaluation per set).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import bn, checks, curves, pytrees, sharding
from mcu_jax.data.batching import check_batch_size, check_indices
from mcu_jax.data.device import Images
from mcu_jax.data.transforms import normalize
from mcu_jax.evaluation import per_sample_outputs
from mcu_jax.models import (
    folded,
    pointwise_impl,
    variable_shapes,
    with_conv3x3,
    with_pointwise,
)

CURVES = curves.KINDS
STRATEGIES = ("auto", "vmap", "map")


def resolve_strategy(strategy: str) -> str:
    """'auto' picks lax.map on CPU (measured: 3-5x faster than vmap there) and vmap on
    accelerators (where map with ``bn_group`` is not yet measured against it;
    docs/benchmarks.md, "The sweep's own program")."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def _padded_batches(indices, batch_size: int):
    """(S, B) index batches padded by repeating the first index, and (S, B) validity."""
    indices = np.asarray(indices, np.int32)
    n = indices.shape[0]
    if n == 0:
        return jnp.zeros((0, 1), jnp.int32), jnp.zeros((0, 1), jnp.float32)
    batch_size = min(batch_size, n)
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    idx = np.concatenate([indices, np.full(pad, indices[0], np.int32)])
    valid = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return jnp.asarray(idx.reshape(steps, batch_size)), jnp.asarray(valid.reshape(steps, -1))


@functools.partial(
    jax.jit,
    static_argnames=("model", "kind", "strategy", "return_probs", "return_stats", "mesh",
                     "fold_bn", "bn_group"),
)
def _sweep_chunk(
    points, ts, template, bn_data, eval_data, *, model, kind, strategy, return_probs,
    return_stats=False, mesh=None, fold_bn=False, bn_group=1,
):
    """``name -> {"correct": (T,), "prob": (T, n_padded)}``; with ``return_stats`` the pair
    ``(that, batch_stats)``, every leaf of ``batch_stats`` with a leading axis T."""
    eval_model = folded(model) if fold_bn else model

    def per_t(t, points, template, bn_data, eval_data):
        bn_images, bn_full, bn_rest = bn_data
        params = curves.point(kind, points, t)
        stats = bn.batch_statistics(model, params, template, bn_images, bn_full, bn_rest,
                                     bn_group)
        variables = {"params": params, "batch_stats": stats}
        result = {}
        for name, (images, batches, valid) in eval_data.items():

            def body(_, xs, images=images):
                idx, v = xs
                x = normalize(images.x[idx], images.mean, images.std)
                logits = eval_model.apply(variables, x, train=False)
                out = per_sample_outputs(logits, images.y[idx])
                return None, (out["correct"] * v, out["prob"])

            _, (correct, prob) = jax.lax.scan(body, None, (batches, valid))
            result[name] = {"correct": correct.sum()}
            if return_probs:
                result[name]["prob"] = prob.reshape(-1)
        return (result, stats) if return_stats else result

    def over_t(ts, points, template, bn_data, eval_data):
        f = functools.partial(
            per_t, points=points, template=template, bn_data=bn_data, eval_data=eval_data
        )
        if strategy == "vmap":
            return jax.vmap(f)(ts)
        return jax.lax.map(f, ts)

    if mesh is None:
        return over_t(ts, points, template, bn_data, eval_data)
    # t parallel: each device takes its slice of ts; everything else is replicated.
    same = jax.sharding.PartitionSpec()
    t_spec = sharding.t_spec(mesh)
    local = jax.shard_map(  # every output leaf (statistics too) has the leading axis T
        over_t, mesh=mesh, in_specs=(t_spec, same, same, same, same), out_specs=t_spec,
        check_vma=False,  # scan carries start replicated and become per-t: not a mistake
    )
    result = local(ts, points, template, bn_data, eval_data)
    # Gathered on every device, so every process (multi-host) can read all of it.
    return jax.lax.with_sharding_constraint(result, sharding.replicated(mesh))


@dataclasses.dataclass
class SweepResult:
    ts: np.ndarray  # (T,)
    acc: dict[str, np.ndarray]  # name -> (T,) accuracy in percent
    probs: dict[str, np.ndarray] | None  # name -> (T, n) true-class probabilities
    # With return_stats: theta(t)'s recomputed BatchNorm statistics, a batch_stats pytree
    # (the template's structure and dtypes) of host numpy arrays, each with a leading axis T.
    batch_stats: Any = None


def sweep(
    model,
    points: Sequence[Any],
    ts,
    template: Any,
    bn_set: tuple[Images, Any],
    eval_sets: dict[str, tuple[Images, Any]],
    *,
    curve: str = "bezier",
    bn_batch_size: int = 128,
    eval_batch_size: int = 500,
    return_probs: bool = False,
    return_stats: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    mesh: Any = None,
    fold_bn: bool = False,
    bn_group: int = 1,
    pointwise: str = "conv",
    conv3x3: str = "conv",
) -> SweepResult:
    """Evaluates the curve at every t in ``ts``.

    Args:
      points: the curve's params pytrees, e.g. ``[theta_o, theta_c, theta_p]``.
      template: a batch_stats pytree of the model (structure only; ``{}`` without BN).
        Both are checked against ``model`` (shapes and dtypes, the points finite)
        before anything is compiled.
      bn_set: ``(images, indices)`` for recomputing BatchNorm statistics at every t.
      eval_sets: ``name -> (images, indices)`` to evaluate at every t.
      return_probs: also return every sample's true-class probability (``probs``).
      return_stats: also return every t's recomputed BatchNorm statistics (``batch_stats``,
        leading axis T): ``{"params": curves.point(curve, points, result.ts[i]),
        "batch_stats": jax.tree.map(lambda a: a[i], result.batch_stats)}`` are the
        variables whose accuracies are ``acc[name][i]`` (``ts[i]`` is the float32 t the
        sweep used). Off (the default), the compiled program is the one without them.
      chunk_size: how many t run together; smaller chunks bound memory (the stacked
        parameters and activations of a chunk). Default: all of them.
      mesh: a ``jax.sharding.Mesh`` (``mcu_jax.sharding.make_mesh``) to split every chunk of
        t over its devices (t parallel; a chunk is rounded up to a multiple of the device
        count and padded); None: one device.
      fold_bn: evaluate with the BatchNorms that follow a convolution folded into it
        (``models.folded``): the same accuracies up to float rounding, fewer passes over the
        activations where XLA fuses the convolution's bias and ReLU (GPUs, with dense
        convolutions: ``strategy="map"``; under ``vmap`` the compiled program moves the same
        bytes). The BatchNorm pass itself (train mode) is unchanged.
      bn_group: how many of the BatchNorm pass's batches run at once
        (``bn.batch_statistics``): the same statistics up to float rounding, in larger and
        fewer kernels, and ``bn_group`` times the pass's activation memory (under ``vmap``,
        times the chunk's t as well). ``strategy="map"`` keeps a GPU's convolutions dense,
        where ``vmap`` over t makes them grouped convolutions (one group per t);
        ``bn_group`` then makes them larger and fewer.
      pointwise: "fused" runs PreResNet's 1x1 convolutions in both passes as one kernel with
        the BatchNorm + ReLU before them and the statistics after them
        (``models.with_pointwise``, ``models/pointwise.py``; a Pallas kernel on GPUs): the
        same accuracies up to float rounding, about 0.6 of the bytes when compiled for an
        H100 (not yet timed on a card); other models are unchanged. With ``fold_bn`` the
        evaluation pass also folds the BatchNorms after the kernel and the 3x3 convolution.
      conv3x3: "fused" also runs PreResNet's stride-1 3x3 convolutions as one kernel with
        bn2 + ReLU before them and bn3's statistics after them (``models.with_conv3x3``,
        ``models/conv3x3.py``; a Pallas kernel on GPUs), in the BatchNorm pass and, unless
        ``fold_bn`` folds bn3 into them, the evaluation pass; the same accuracies up to
        float rounding. It needs the 1x1 kernel (``pointwise``, here or the model's own).
    """
    plan = _plan(model, points, ts, template, bn_set, eval_sets, curve=curve,
                 bn_batch_size=bn_batch_size, eval_batch_size=eval_batch_size,
                 return_probs=return_probs, return_stats=return_stats, strategy=strategy,
                 chunk_size=chunk_size, mesh=mesh, fold_bn=fold_bn, bn_group=bn_group,
                 pointwise=pointwise, conv3x3=conv3x3)
    ts = plan.ts
    outs = []
    for lo in range(0, ts.size, plan.chunk):
        part = ts[lo : lo + plan.chunk]
        out = _sweep_chunk(*plan.args(part), **plan.statics)
        outs.append(jax.tree.map(lambda a, k=part.size: np.asarray(a)[:k], out))
    stats = None
    if return_stats:
        outs, chunk_stats = [o for o, _ in outs], [s for _, s in outs]
        stats = jax.tree.map(lambda *a: np.concatenate(a), *chunk_stats)
    acc = {}
    probs = {} if return_probs else None
    for name, n in plan.sizes.items():
        correct = np.concatenate([o[name]["correct"] for o in outs])
        acc[name] = 100.0 * correct / n if n else np.full(ts.size, np.nan)
        if return_probs:
            probs[name] = np.concatenate([o[name]["prob"][:, :n] for o in outs])
    return SweepResult(ts=ts, acc=acc, probs=probs, batch_stats=stats)


@dataclasses.dataclass
class _Plan:
    """Validated arguments of :func:`sweep`, laid out as its compiled chunks take them."""

    ts: np.ndarray  # (T,) float32
    chunk: int  # t per compiled call
    points: list
    template: Any
    bn_data: tuple
    eval_data: dict
    sizes: dict[str, int]  # set name -> number of samples
    statics: dict  # the static arguments of _sweep_chunk
    mesh: Any

    def args(self, part: np.ndarray) -> tuple:
        """:func:`_sweep_chunk`'s arguments for the t in ``part``: padded with the last t to a
        whole chunk and placed as the chunk takes them."""
        padded = np.concatenate([part, np.full(self.chunk - part.size, part[-1], np.float32)])
        ts = (jnp.asarray(padded) if self.mesh is None
              else sharding.place(padded, sharding.t_sharding(self.mesh)))
        return self.points, ts, self.template, self.bn_data, self.eval_data


def _plan(model, points, ts, template, bn_set, eval_sets, *, curve, bn_batch_size,
          eval_batch_size, return_probs, return_stats, strategy, chunk_size, mesh,
          fold_bn=False, bn_group=1, pointwise="conv", conv3x3="conv") -> _Plan:
    try:
        ts = np.asarray(ts, np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"ts must be a 1-d sequence of numbers, got {ts!r}"[:300]) from None
    if ts.ndim != 1:  # a (2, 2) grid would be swept flattened, a scalar is not a sequence
        raise ValueError(f"ts must be 1-d (one t per point), got shape {ts.shape}")
    if ts.size == 0:
        raise ValueError("ts is empty")
    if np.any((ts < 0) | (ts > 1)) or not np.all(np.isfinite(ts)):
        raise ValueError(f"every t must lie in [0, 1], got {ts}")
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}; known: {CURVES}")
    bn_images, bn_idx = bn_set
    _check_model_variables(model, points, template, bn_images.x.shape[1:])
    strategy = resolve_strategy(strategy)
    bn_group = check_batch_size("bn_group", bn_group)
    model = sweep_model(model, pointwise, conv3x3)
    chunk = checks.optional_integer("chunk_size", chunk_size, 1) or ts.size
    if mesh is not None:
        n_dev = sharding.num_shards(mesh)
        chunk = -(-chunk // n_dev) * n_dev
    bn_idx = check_indices("bn_set", bn_idx, bn_images.num_examples, allow_empty=False)
    bn_data = (bn_images, *bn.bn_batches(bn_idx, bn_batch_size, bn_images.num_examples))
    full = bn_data[1]  # the static is the group that runs, so equal layouts share a program
    bn_group = 1 if full is None else bn.group_layout(full.shape[0], bn_group)[1]
    check_batch_size("eval_batch_size", eval_batch_size)
    eval_sets = {
        name: (images, check_indices(f"eval_sets[{name!r}]", idx, images.num_examples,
                                     allow_empty=False))
        for name, (images, idx) in eval_sets.items()
    }
    eval_data = {
        name: (images, *_padded_batches(idx, eval_batch_size))
        for name, (images, idx) in eval_sets.items()
    }
    sizes = {name: len(np.asarray(idx)) for name, (_, idx) in eval_sets.items()}
    points = list(points)
    if mesh is not None:  # once; every chunk then reads the replicated copies
        points, template, bn_data, eval_data = sharding.replicate(
            (points, template, bn_data, eval_data), mesh
        )
    statics = dict(model=model, kind=curve, strategy=strategy, return_probs=return_probs,
                   return_stats=return_stats, mesh=mesh, fold_bn=bool(fold_bn),
                   bn_group=bn_group)
    return _Plan(ts, chunk, points, template, bn_data, eval_data, sizes, statics, mesh)


def _check_model_variables(model, points: Sequence[Any], template: Any,
                           input_shape: Sequence[int]) -> None:
    """ValueError unless every point is ``model``'s params and ``template`` its batch_stats
    (the first leaf that differs is named; the points finite), before anything is compiled:
    another model's would fail inside Flax or a tree_map. The model's shapes are made once
    and compared with the first point; the others are compared with it. Shapes
    (``jax.ShapeDtypeStruct``) pass for arrays; the template's values are not read."""
    if not isinstance(points, Sequence) or isinstance(points, str | bytes) or not points:
        raise ValueError(f"points must be a non-empty list of params pytrees, got "
                         f"{type(points).__name__}")
    expected = variable_shapes(model, input_shape)
    model_name = f"the {type(model).__name__} model"
    pytrees.check_compatible(**{f"{model_name}'s params": expected["params"],
                                "points[0]": points[0]})
    for i, p in enumerate(points):
        if i:
            pytrees.check_compatible(**{"points[0]": points[0], f"points[{i}]": p})
        pytrees.check_finite(f"points[{i}]", p)
    pytrees.check_compatible(**{f"{model_name}'s batch_stats": expected["batch_stats"],
                                "template": jax.eval_shape(lambda t: t, template)})


def sweep_model(model, pointwise: str = "conv", conv3x3: str = "conv"):
    """The model :func:`sweep` runs for its ``pointwise`` and ``conv3x3`` (both checked;
    "conv" leaves the model's own setting): ValueError for a ``conv3x3`` kernel on a model
    whose 1x1 convolutions, as set, are not the kernel that it reads from."""
    if pointwise_impl(pointwise) != "conv":
        model = with_pointwise(model, pointwise)
    if pointwise_impl(conv3x3, "conv3x3") != "conv":
        model = with_conv3x3(model, conv3x3)
    return model


def chunk_program(model, points: Sequence[Any], ts, template: Any,
                  bn_set: tuple[Images, Any], eval_sets: dict[str, tuple[Images, Any]],
                  **options) -> tuple[Any, tuple, dict]:
    """``(program, args, statics)``: the jitted program that :func:`sweep` with the same
    arguments runs once per chunk of t, the arguments of its first chunk and its static
    keywords, so that ``program.lower(*args, **statics)`` compiles it without running it
    (:func:`precompile`; ``experiments/cost_analysis.py`` compiles it for a GPU it does not
    have). ``options`` are :func:`sweep`'s keywords; only shapes and dtypes matter, so
    ``points`` may hold any arrays shaped like the curve's and ``ts`` any values of the same
    count. Every chunk is padded to the same number of t, so one program serves them all."""
    # sweep's own signature supplies the defaults (and rejects unknown options).
    call = inspect.signature(sweep).bind(model, points, ts, template, bn_set, eval_sets,
                                         **options)
    call.apply_defaults()
    plan = _plan(**call.arguments)
    return _sweep_chunk, plan.args(plan.ts[: plan.chunk]), plan.statics


def precompile(model, points: Sequence[Any], ts, template: Any, bn_set: tuple[Images, Any],
               eval_sets: dict[str, tuple[Images, Any]], **options) -> None:
    """Compiles the program(s) that :func:`sweep` with the same arguments will run, without
    running them (the arguments as :func:`chunk_program` takes them). XLA releases the GIL
    while it compiles, so a thread can compile the sweep while the main thread trains the
    curve; the later :func:`sweep` call then reuses the program.
    """
    program, args, statics = chunk_program(model, points, ts, template, bn_set, eval_sets,
                                           **options)
    program.lower(*args, **statics).compile()
