"""Curve training (paper sections 2.2-2.4): learn the control point theta_c of a Bezier
curve between theta_o and theta_p so that points on it forget D_f and keep D_r.

Per minibatch (drawn from the shuffled union of the retain subset and D_f): sample
t ~ U(0, 1), form phi(t) from (theta_o, theta_c, theta_p), run the model in train mode and
minimise CE(retain part) - beta * CE(forget part). Only theta_c's tensors selected by the
parameter mask are differentiated and updated: gradients of the other tensors are never
formed (that is where the mask's speed-up comes from) and they stay bit-for-bit at their
initial value. beta is either fixed or adaptive (section 2.4): computed for every batch from
that batch's own train-mode accuracies at the sampled t (the same forward pass; accuracies
carry no gradient) and used in that batch's loss, as the paper's Algorithm 1 and the
authors' release do. A batch without a retain or a forget part keeps the previous beta
(``beta_init`` before the first batch); without a forget part beta does not matter anyway.

theta_c's trained tensors are kept packed (``packing``; ``CurveState``), so the optimiser's
update is one kernel rather than one per tensor; :func:`control_point` rebuilds the pytree.
The vectors among them (BatchNorm scales and offsets, biases) are packed apart from the
other tensors and combined with theta_o's and theta_p's, packed alike, as one vector: one
kernel forms theta(t) for all of them instead of one kernel per vector (:func:`layouts`).
The other tensors (convolution and dense weights) are packed alike and combined by
``combine.weighted_sum``, on GPUs in one kernel with an output per tensor (one per packed
vector: the trained and the frozen tensors apart), each in the dtype the model computes with
it (:func:`models.kernel_dtypes`).
Convolution filters are held output-channel first (:data:`FILTER_ORDER`), as GPUs read
them, so that no filter or filter gradient is transposed in a step.

The curve is the paper's quadratic Bezier by default; ``MCUConfig(curve="polychain")``
trains the same three points as a polygonal chain theta_o -> theta_c (t = 1/2) -> theta_p
instead (Garipov et al.'s other curve), for research on the path's shape.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mcu_jax import checkpoint, checks, combine, curves, loop, packing, pytrees, runs
from mcu_jax.data.batching import check_indices
from mcu_jax.data.device import Images
from mcu_jax.data.splits import SCENARIOS
from mcu_jax.data.transforms import prepare_batch
from mcu_jax.evaluation import per_sample_outputs
from mcu_jax.models import check_variables, conv_filters, kernel_dtypes
from mcu_jax.protocols import check_setting

BETA_MODES = ("adaptive", "fixed")
#: Curves of one control point that curve training can shape (``curves.point`` kinds).
MCU_CURVES = ("bezier", "polychain")


@dataclasses.dataclass(frozen=True)
class MCUConfig:
    """Curve-training hyperparameters; defaults are the paper's CIFAR-10 random setting
    (:func:`paper_config` gives the other settings')."""

    epochs: int = 10  # paper: 10 random forgetting, 5 class-wise
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    beta_mode: str = "adaptive"  # "adaptive" (MCU_beta) or "fixed" (MCU)
    beta: float = 0.2  # the fixed beta (paper's ablation default)
    beta_values: tuple[float, float, float] = (0.0, 0.1, 0.5)  # adaptive cases 1, 2, 3
    beta_init: float = 0.5  # adaptive beta before the first batch (see the module docstring)
    augment: bool = True  # the data set's training augmentation during curve training
    steps_per_call: int = 50
    progress: bool = True
    checkpoint_every: int = 1  # epochs between checkpoints when a checkpoint_dir is given
    curve: str = "bezier"  # "bezier" (the paper's) or "polychain" through theta_c at t = 1/2
    # how a step forms the curve point's weight tensors (combine.IMPLS): "auto" one Pallas
    # kernel on NVIDIA GPUs, XLA ops elsewhere; "xla"; "pallas" (the kernel, GPUs only);
    # "interpret" (the kernel interpreted, for tests)
    combine: str = "auto"

    def __post_init__(self):
        checks.choice("beta_mode", self.beta_mode, BETA_MODES)
        checks.choice("curve", self.curve, MCU_CURVES)
        checks.choice("combine", self.combine, combine.IMPLS)
        checks.integer("epochs", self.epochs, 0)
        for name in ("batch_size", "steps_per_call", "checkpoint_every"):
            checks.integer(name, getattr(self, name), 1)
        checks.number("lr", self.lr, positive=True)
        checks.number("momentum", self.momentum, low=0, below=1)
        if not isinstance(self.beta_values, tuple | list) or len(self.beta_values) != 3:
            raise ValueError(f"beta_values needs 3 values, got {self.beta_values!r}")
        # beta weighs the forget loss that is subtracted: a negative one would learn D_f
        for i, value in enumerate(self.beta_values):
            checks.number(f"beta_values[{i}] (a penalty on the forget loss)", value, low=0)
        for name in ("beta", "beta_init"):
            checks.number(f"{name} (a penalty on the forget loss)", getattr(self, name), low=0)
        for name in ("augment", "progress"):
            checks.flag(name, getattr(self, name))


# Curve-training epochs of the paper's protocols (NOTES.md) where they differ from the random
# setting's 10: the ViT on ImageNet-100 trains 2, Tiny-ImageNet 5 (appendix C; its sentence
# resumes after Table 2). Other settings (CIFAR-10, CIFAR-100, digits): 5 class-wise.
_PAPER_EPOCHS = {"imagenet100": 2, "tinyimagenet": 5}


def paper_config(scenario: str = "random", setting: str = "cifar10", **overrides) -> MCUConfig:
    """The paper's curve training for ``scenario`` ("random" or "class") in ``setting`` (a
    ``protocols.SETTINGS`` name, aliases accepted): SGD lr 0.01, momentum 0.9, batch 128,
    10 epochs for random forgetting and 5 class-wise (2 on ImageNet-100, 5 on
    Tiny-ImageNet); ``overrides`` replace fields."""
    checks.choice("scenario", scenario, SCENARIOS)
    epochs = _PAPER_EPOCHS.get(check_setting(setting), 10 if scenario == "random" else 5)
    checks.known_fields("paper_config", MCUConfig, overrides)
    return MCUConfig(**{"epochs": epochs, **overrides})


def adaptive_beta(acc_forget, acc_retain, ref_train, ref_val, values=(0.0, 0.1, 0.5)):
    """The three-case rule of section 2.4 (accuracies in percent), as printed in the paper.

    1. acc_forget <= ref_val                                      -> values[0]
    2. acc_forget > ref_val and
       (acc_forget - ref_val) / ref_val < (acc_retain - ref_train) / ref_train -> values[1]
    3. otherwise                                                  -> values[2]

    Class-wise forgetting passes ref_val = 0: case 2's ratio is then undefined and the case
    counts as false (never NaN), so beta is values[0] only once the class is fully forgotten.
    Works on scalars or arrays and under jit.
    """
    acc_f = jnp.asarray(acc_forget, jnp.float32)
    acc_r = jnp.asarray(acc_retain, jnp.float32)
    ref_t = jnp.asarray(ref_train, jnp.float32)
    ref_v = jnp.asarray(ref_val, jnp.float32)
    safe_v = jnp.where(ref_v > 0, ref_v, 1.0)
    safe_t = jnp.where(ref_t > 0, ref_t, 1.0)
    case1 = acc_f <= ref_v
    case2 = (ref_v > 0) & ((acc_f - ref_v) / safe_v < (acc_r - ref_t) / safe_t)
    if len(values) != 3:
        raise ValueError(f"values needs one beta per case (3), got {values!r}")
    v = jnp.asarray(values, jnp.float32)
    return jnp.where(case1, v[0], jnp.where(case2, v[1], v[2]))


def split_loss(per_sample_loss, is_forget):
    """Means of the retain and forget parts of a batch; an empty part gives 0, never NaN."""
    f = is_forget.astype(per_sample_loss.dtype)
    r = 1.0 - f
    n_f, n_r = f.sum(), r.sum()
    mean_r = (per_sample_loss * r).sum() / jnp.maximum(n_r, 1.0)
    mean_f = (per_sample_loss * f).sum() / jnp.maximum(n_f, 1.0)
    return mean_r, mean_f, n_r, n_f


class CurveState(struct.PyTreeNode):
    # theta_c's masked tensors packed (:func:`curve_layouts`): {"vectors": ..., "tensors":
    # ...}, each one vector per dtype, so that the optimiser's update is one kernel
    trainable: dict  # part -> "dtype:fingerprint of the tensors" -> (size,) array
    opt_state: Any
    beta: jax.Array  # beta of the last batch (kept for a batch that lacks a part)


class CurveConsts(struct.PyTreeNode):
    # The points packed as the step combines them (:func:`packed_points`), by part:
    # {"trained": [theta_o's, theta_p's], "frozen": [theta_o's, theta_c's, theta_p's]}
    points: dict
    batch_stats: Any
    images: Images
    is_forget: jax.Array  # (N,) bool over the training set
    refs: jax.Array  # (2,) Acc_o(D_train), forget reference (Acc_o(D_v) or 0), percent
    # the paths of the convolution filters (models.conv_filters), stored in FILTER_ORDER
    filters: frozenset = struct.field(pytree_node=False)
    # the paths of theta_c's tensors outside the mask (their values: in ``points``)
    frozen: frozenset = struct.field(pytree_node=False)


PARTS = ("vectors", "tensors")

#: The axis order in which curve training stores a convolution filter (Flax's HWIO: height,
#: width, input and output channels): output channels first (OHWI), the order in which
#: NVIDIA's convolution libraries read a filter and write its gradient. Stored so, theta(t)'s
#: filter is combined from theta_o's, theta_c's and theta_p's in the layout the convolution
#: reads, and its gradient is packed as the library writes it; stored as Flax holds them,
#: XLA transposes every filter and every filter gradient in every step (docs/benchmarks.md,
#: "Fewer kernels: filters stored as GPUs read them"). The order is the same on every
#: backend, so that a checkpoint resumes anywhere: on the CPU the main job's time did not
#: change; other accelerators are not measured.
FILTER_ORDER = (3, 0, 1, 2)


def stored(flat: dict, filters: frozenset) -> dict:
    """``flat`` (path -> array or ``jax.ShapeDtypeStruct``) with the tensors at ``filters``'
    paths in :data:`FILTER_ORDER`, as curve training holds them."""
    return _permuted(flat, filters, FILTER_ORDER)


def restored(flat: dict, filters: frozenset) -> dict:
    """The inverse of :func:`stored`: every tensor in the model's own axis order."""
    return _permuted(flat, filters, tuple(int(i) for i in np.argsort(FILTER_ORDER)))


def _permuted(flat: dict, filters: frozenset, order: tuple[int, ...]) -> dict:
    def permute(v):
        if isinstance(v, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(tuple(v.shape[i] for i in order), v.dtype)
        return jnp.transpose(v, order)

    return {k: permute(v) if k in filters else v for k, v in flat.items()}


def layouts(flat: dict) -> dict[str, packing.Layout]:
    """The tensors of ``flat`` in two packing layouts (each in ``flat``'s order, possibly
    empty): "vectors", those of at most one axis (BatchNorm scales and offsets, biases), and
    "tensors", the others (convolution and dense weights). The step combines both tensor by
    tensor (in one kernel per layout on GPUs: ``combine``), since library calls (cuDNN,
    cuBLAS) and the Pallas kernels read each as a buffer of its own (a slice of a packed
    vector given to them is a copy, a kernel of its own); the two are packed apart so that
    each part's kernel has fewer outputs."""
    part = {k: PARTS[np.ndim(v) > 1] for k, v in flat.items()}
    return {name: packing.Layout.of({k: v for k, v in flat.items() if part[k] == name})
            for name in PARTS}


def curve_layouts(params_template, frozen: Collection[str],
                  filters: frozenset) -> dict[str, dict[str, packing.Layout]]:
    """Where theta_c's tensors, :func:`stored` with ``filters``, lie, by part
    (:func:`layouts`): "trained" (those not in ``frozen``) in ``CurveState.trainable``,
    "frozen" in ``CurveConsts.points[part]["frozen"]``."""
    # In the template's order, not frozen's (a set's order changes with PYTHONHASHSEED, and a
    # dict from jit sorts its keys as strings: "bn-2/bias" before "bn/bias")
    shapes = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype)
              for k, v in pytrees.flatten(params_template).items()}
    return {group: layouts(stored({k: v for k, v in shapes.items()
                                   if (k in frozen) == (group == "frozen")}, filters))
            for group in ("trained", "frozen")}


def _pick(flat: dict, layout: packing.Layout) -> dict:
    return {k: flat[k] for k in layout.paths}


def packed_points(p_o, p_p, frozen: dict, filters: frozenset, where: dict) -> dict:
    """``CurveConsts.points``: for each part (:func:`layouts`), theta_o's and theta_p's
    trained tensors packed as ``CurveState.trainable[part]``, and theta_o's, theta_c's and
    theta_p's frozen ones (``frozen``: theta_c's, stored), all :func:`stored`; ``where``:
    :func:`curve_layouts`."""
    trained, fixed = where["trained"], where["frozen"]
    ends = [stored(pytrees.flatten(p), filters) for p in (p_o, p_p)]
    return {part: {"trained": [packing.pack(trained[part], _pick(e, trained[part]))
                               for e in ends],
                   "frozen": [packing.pack(fixed[part], _pick(f, fixed[part]))
                              for f in (ends[0], frozen, ends[1])]}
            for part in PARTS}


def control_point(params_template, trainable: dict, consts: CurveConsts):
    """theta_c rebuilt from its trained part (packed, ``CurveState.trainable``) and its
    frozen part (packed in ``consts.points``), in the model's own axis order."""
    where = curve_layouts(params_template, consts.frozen, consts.filters)
    flat = {}
    for part in PARTS:
        flat.update(packing.unpack(where["trained"][part], trainable[part]))
        flat.update(packing.unpack(where["frozen"][part], consts.points[part]["frozen"][1]))
    return pytrees.unflatten(params_template, restored(flat, consts.filters))


def make_curve_step(model, tx, config: MCUConfig, params_template):
    """The jit-able per-batch MCU step ``(state, consts, idx, key) -> (state, metrics)``.

    The loss is differentiated in the curve point's trained tensors (formed tensor by tensor,
    :func:`layouts`), and their gradients are packed (one vector per dtype and
    part) before they are scaled by the control point's weight ``w_c(t)`` (the chain rule
    through the curve: ``d theta(t) / d theta_c = w_c(t)``), so that the scaling, the
    momentum and the update are one kernel (``packing``).
    """
    values = tuple(float(v) for v in config.beta_values)
    dtypes = kernel_dtypes(model, params_template)

    def step(state: CurveState, c: CurveConsts, idx, key):
        k_t, k_aug, k_drop = jax.random.split(key, 3)
        t = jax.random.uniform(k_t, ())
        imgs = c.images
        kind = imgs.augment if config.augment else "none"
        x = prepare_batch(k_aug, imgs.x[idx], imgs.mean, imgs.std, kind, True)
        y = imgs.y[idx]
        is_f = c.is_forget[idx]
        adaptive = config.beta_mode == "adaptive"

        w = curves.weights(config.curve, t)  # theta(t) = sum_k w[k] * points[k]
        where = curve_layouts(params_template, c.frozen, c.filters)
        trained_l, frozen_l = where["trained"], where["frozen"]

        def per_tensor(layout, points: list) -> dict:  # in the stored axis order
            return combine.weighted_sum(layout, points, w, {
                k: dtypes[k] for k in layout.paths if k in dtypes}, impl=config.combine)

        def ends(part, theta_c):
            o, p = c.points[part]["trained"]
            return [o, theta_c, p]

        # theta(t)'s tensors outside the mask, and the trained ones, which are differentiated
        fixed = {**restored(per_tensor(frozen_l["tensors"], c.points["tensors"]["frozen"]),
                            c.filters),
                 **per_tensor(frozen_l["vectors"], c.points["vectors"]["frozen"])}
        trained = {part: per_tensor(trained_l[part], ends(part, state.trainable[part]))
                   for part in PARTS}

        def objective(trained):
            params = pytrees.unflatten(params_template, {
                **fixed, **trained["vectors"], **restored(trained["tensors"], c.filters)})
            logits, _ = model.apply(
                {"params": params, "batch_stats": c.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": k_drop},
            )
            out = per_sample_outputs(logits, y)
            ce_r, ce_f, n_r, n_f = split_loss(out["loss"], is_f)
            acc_r, acc_f, _, _ = split_loss(100.0 * out["correct"], is_f)
            acc_r, acc_f = jax.lax.stop_gradient(acc_r), jax.lax.stop_gradient(acc_f)
            if adaptive:  # this batch's accuracies at this t; kept when a part is empty
                proposed = adaptive_beta(acc_f, acc_r, c.refs[0], c.refs[1], values)
                beta = jnp.where((n_r > 0) & (n_f > 0), proposed, state.beta)
            else:
                beta = jnp.float32(config.beta)
            loss = ce_r - beta * ce_f
            return loss, dict(ce_r=ce_r, ce_f=ce_f, acc_r=acc_r, acc_f=acc_f, n_r=n_r, n_f=n_f,
                              beta=beta, loss=loss)

        grads, m = jax.grad(objective, has_aux=True)(trained)
        # (in float32: a tensor that the model computes with in bfloat16 has its gradient so)
        grads = {part: packing.pack(trained_l[part], {
            k: grads[part][k].astype(d)
            for k, d in zip(trained_l[part].paths, trained_l[part].dtypes, strict=True)})
            for part in PARTS}
        grads = jax.tree.map(lambda g: w[1].astype(g.dtype) * g, grads)  # w_c(t)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"t": t, **m}
        next_beta = m["beta"] if adaptive else state.beta
        return CurveState(trainable, opt_state, next_beta.astype(jnp.float32)), metrics

    return step


#: MCUConfig's settings that change results only by float rounding: a curve's folder (and
#: an MCU run's, ``pipeline``) may be resumed or rerun with other values of them.
FREE_FIELDS = ("combine",)

_SECONDS = "seconds"  # an epoch's wall-clock time in the checkpointed history


def _summarize(values: tuple[float, ...]):
    def summarize(m: dict) -> dict:
        out = {k: float(np.mean(m[k])) for k in ("loss", "ce_r", "ce_f", "acc_r", "acc_f", "t")}
        beta = np.asarray(m["beta"])
        out["beta_mean"] = float(beta.mean())
        out["beta_hist"] = {f"{v:g}": int(np.sum(np.isclose(beta, v))) for v in values}
        return out

    return summarize


@dataclasses.dataclass
class CurveResult:
    theta_c: Any  # params pytree of the trained control point
    mask: Any  # pytree of bools: which tensors were trained
    history: list[dict]
    minutes: float
    # Wall-clock seconds of every epoch but each session's first (which compiles the step, or
    # restores a checkpoint), over all sessions: kept with the checkpoints, so a resumed run,
    # finished or not, still has the earlier sessions' epochs.
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)


def steady_epoch_seconds(epoch_seconds: list[float]) -> float | None:
    """Mean seconds per epoch, compilation excluded (``CurveResult.epoch_seconds``); None
    when no epoch was timed (a single epoch per session)."""
    return float(np.mean(epoch_seconds)) if epoch_seconds else None


def setup_curve(model, theta_o: dict, theta_p: dict, theta_c, mask, images: Images, is_forget,
                refs: tuple[float, float], config: MCUConfig, mesh=None,
                unrolled: bool | None = None):
    """The loop state, constants and compiled runner of curve training.

    theta_c is split by the mask into the trained tensors (the state, with their optimiser
    state and beta) and the frozen ones (constants, never differentiated). ``refs`` is
    (Acc_o(D_train), forget reference) in percent. Shared by :func:`train_curve` and the
    benchmark, so both time the same step. ``unrolled`` is :func:`loop.make_runner`'s (None:
    per-step calls on CPU, ``lax.scan`` elsewhere).
    """
    p_o, p_p = theta_o["params"], theta_p["params"]
    flat_c = pytrees.flatten(theta_c)
    flat_mask = pytrees.flatten(mask)
    missing, extra = sorted(set(flat_c) - set(flat_mask)), sorted(set(flat_mask) - set(flat_c))
    if missing or extra:
        raise ValueError("mask must have one boolean per parameter tensor of theta_o; "
                         f"tensors without one: {missing[:3]}, not tensors: {extra[:3]}")
    for k, v in flat_mask.items():
        if np.ndim(v) != 0 or np.asarray(v).dtype != bool:
            raise ValueError(f"mask[{k!r}] must be one boolean for the whole tensor (the mask "
                             f"is per tensor), got {np.asarray(v).dtype} {np.shape(v)}")
    flat_mask = {k: bool(v) for k, v in flat_mask.items()}
    trainable = {k: v for k, v in flat_c.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat_c.items() if not flat_mask[k]}
    if not trainable:
        raise ValueError("the parameter mask selects no tensor: nothing to train")
    filters = conv_filters(model, p_o)
    trainable = stored(trainable, filters)
    where = curve_layouts(p_o, frozen, filters)
    trainable = {part: packing.pack(layout, _pick(trainable, layout))
                 for part, layout in where["trained"].items()}
    frozen = stored(frozen, filters)
    consts = CurveConsts(
        points=packed_points(p_o, p_p, frozen, filters, where),
        batch_stats=theta_o.get("batch_stats", {}),
        images=images,
        is_forget=jnp.asarray(is_forget),
        refs=jnp.asarray(refs, jnp.float32),
        filters=filters,
        frozen=frozenset(frozen),
    )
    tx = optax.sgd(config.lr, momentum=config.momentum or None)
    state = CurveState(trainable, tx.init(trainable), jnp.float32(config.beta_init))
    runner = loop.make_runner(make_curve_step(model, tx, config, p_o), unrolled=unrolled,
                              mesh=mesh)
    return state, consts, runner


def check_curve_data(forget: Any, retain_subset: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The curve-training indices into ``n`` images, checked: D_f and the retain subset in
    range, neither empty, and disjoint (ValueError naming what is wrong)."""
    forget = check_indices("forget", forget, n)
    retain_subset = check_indices("retain_subset", retain_subset, n)
    if forget.size == 0:
        raise ValueError("the forget set D_f is empty: there is nothing to unlearn")
    if retain_subset.size == 0:
        raise ValueError("the retain subset is empty: curve training needs retain data")
    overlap = np.intersect1d(forget, retain_subset)
    if overlap.size:
        raise ValueError(
            f"retain_subset and forget share {overlap.size} indices (e.g. {overlap[0]}); "
            "D_r and D_f must be disjoint"
        )
    return forget, retain_subset


def check_refs(refs: Any) -> None:
    """ValueError unless ``refs`` holds theta_o's reference accuracies "train" and "val" in
    percent (finite, in [0, 100], and not both <= 1, which are fractions by mistake)."""
    missing = [k for k in ("train", "val") if not isinstance(refs, dict) or k not in refs]
    if missing:
        raise ValueError(
            f"refs lacks {missing}: pass theta_o's reference accuracies in percent, "
            "e.g. train.reference_accuracies(...)"
        )
    values = {k: checks.number(f"refs[{k!r}]", refs[k]) for k in ("train", "val")}
    if not all(0.0 <= v <= 100.0 for v in values.values()):
        raise ValueError(f"refs must be accuracies in percent in [0, 100], got {values}")
    if max(values.values()) <= 1.0:
        raise ValueError(f"refs look like fractions ({values}); they are accuracies in percent, "
                         "e.g. 98.5 for 98.5%")


def train_curve(
    model,
    theta_o: dict,
    theta_p: dict,
    images: Images,
    retain_subset,
    forget,
    refs: dict,
    config: MCUConfig,
    key: jax.Array,
    *,
    mask: Any = None,
    theta_c: Any = None,
    class_wise: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    mesh: Any = None,
) -> CurveResult:
    """Trains theta_c of the curve theta_o -> theta_p (variables dicts; ``config.curve``,
    the paper's quadratic Bezier by default).

    ``refs`` holds theta_o's reference accuracies in percent (keys "train" and "val");
    class-wise forgetting uses 0 as the forget reference. ``mask`` (pytree of bools per
    params tensor, default all True) selects the trained tensors; ``theta_c`` defaults to
    the midpoint, so the initial curve is the straight line.

    ``mesh`` (``mcu_jax.sharding.make_mesh``) makes curve training data parallel: every
    batch is split over the mesh's devices (``config.batch_size`` must be divisible by their
    number), train-mode BatchNorm uses the statistics of the whole batch, and theta_c equals
    the single-device result within float tolerance (its arrays replicated on the mesh).
    """
    shape = (1, *images.x.shape[1:])
    check_variables(model, theta_o, shape, "theta_o")  # also finite
    # theta_p's batch_stats are never read (points take theta_o's): its params will do
    check_variables(model, {"batch_stats": theta_o.get("batch_stats", {}), **theta_p}
                    if isinstance(theta_p, dict) else theta_p, shape, "theta_p")
    checks.key("key", key)
    p_o, p_p = theta_o["params"], theta_p["params"]
    start_point = "midpoint" if theta_c is None else runs.tree_digest(theta_c)
    if theta_c is None:
        theta_c = curves.midpoint(p_o, p_p)
    pytrees.check_compatible(theta_o=p_o, theta_c=theta_c)
    pytrees.check_finite("theta_c", theta_c)
    if mask is None:
        mask = jax.tree.map(lambda _: True, p_o)
    forget, retain_subset = check_curve_data(forget, retain_subset, images.num_examples)
    check_refs(refs)
    is_forget = np.zeros(images.num_examples, bool)
    is_forget[forget] = True
    ref_forget = 0.0 if class_wise else float(refs["val"])
    state, consts, runner = setup_curve(
        model, theta_o, theta_p, theta_c, mask, images, is_forget,
        (float(refs["train"]), ref_forget), config, mesh,
    )
    loop_cfg = loop.LoopConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        steps_per_call=config.steps_per_call,
        progress=config.progress,
        desc=f"MCU ({config.beta_mode} beta)",
        checkpoint_every=config.checkpoint_every,
    )
    pool = np.concatenate([retain_subset, forget])
    if checkpoint_dir is not None:
        # The folder answers only this training (runs.RunDir's run.json): a resume with other
        # end points, theta_c, mask, data, references, config or key is refused instead of
        # continuing another curve (the speed settings and FREE_FIELDS may change).
        runs.RunDir(checkpoint_dir).open({
            "mcu": dataclasses.asdict(config), "theta_c": start_point,  # "midpoint" or digest
            **{name: runs.tree_digest(tree) for name, tree in (
                ("theta_o", theta_o), ("theta_p", theta_p), ("mask", mask))},
            "retain_subset": runs.digest(retain_subset), "forget": runs.digest(forget),
            "refs": [float(refs["train"]), ref_forget], "key": runs.key_list(key),
        }, ignore=(*runs.IGNORED_FIELDS, *FREE_FIELDS))
    earlier = loop.earlier_seconds(checkpoint_dir)  # sessions before a resume count too
    ckpt = checkpoint.Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    start = time.perf_counter()
    ends = [start]  # the loop summarises each epoch once its metrics are on the host
    summarize = _summarize(config.beta_values)

    def timed_summarize(m: dict) -> dict:
        ends.append(time.perf_counter())
        record = summarize(m)
        if len(ends) > 2:  # not this session's first epoch: no compilation in it
            record[_SECONDS] = ends[-1] - ends[-2]
        return record

    try:
        state, history = loop.run_epochs(
            runner, state, consts, pool, key, loop_cfg, ckpt, timed_summarize, mesh=mesh,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
    minutes = (earlier + time.perf_counter() - start) / 60.0
    theta_c = control_point(p_o, state.trainable, consts)
    # The seconds travel in the checkpointed history; callers get them apart, so that the
    # history of a run does not depend on the machine's speed.
    epoch_seconds = [h.pop(_SECONDS) for h in history if _SECONDS in h]
    return CurveResult(theta_c=theta_c, mask=mask, history=history, minutes=minutes,
                       epoch_seconds=epoch_seconds)
