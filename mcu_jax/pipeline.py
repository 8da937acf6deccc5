"""MCU in one call: mask -> curve training -> t-sweep -> model selection -> exported model.

``run_mcu`` takes the two end points (theta_o and a pre-unlearned theta_p from any method),
the data split and theta_o's reference accuracies, and returns everything the paper reports
about one curve: the trained control point, the sweep over t, the effective region, the
optimal t* (predicted by interpolation, then materialised and measured for real) and the
variables of theta(t*), exported as an ordinary model checkpoint when ``out_dir`` is given.

Materialising t* is a second sweep over the single point t* that also returns its
recomputed BatchNorm statistics (``sweep.sweep(..., return_stats=True)``): one compiled
program measures theta(t*) on every set, where a BatchNorm pass and a separate evaluation
per set size would each compile a program of their own (10-35 s apiece for PreResNet-110
on an H100).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import checkpoint, checks, curves, masks, runs, selection, sweep
from mcu_jax.data.batching import check_indices
from mcu_jax.data.device import Images
from mcu_jax.mcu import FREE_FIELDS, MCUConfig, check_curve_data, check_refs, train_curve
from mcu_jax.models import POINTWISE, check_variables

BN_SETS = ("retain", "train")
MASK_KINDS = ("parameter", "random")

#: Each finished phase (mask, curve, sweep, selection) is logged at INFO with its seconds, so
#: a long run that is stopped still shows where its time went (the benchmark prints these).
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How the path is evaluated and the model chosen (paper section 2.5)."""

    num_t: int = 20  # uniform sweep points in [0, 1]
    t_lo: float = 0.75  # t* is searched in [t_lo, t_hi]
    t_hi: float = 1.0
    # The gap's interpolant (selection.INTERPOLATIONS): "cubic", the paper's spline, or
    # "pchip", shape-preserving: it stays within the measured gaps, so t* and the region never
    # rest on the spline's overshoot (after a steep drop or on a plateau).
    interpolation: str = "cubic"
    include_test: bool = True  # the release leaves the test term out of the gap
    bn_set: str = "retain"  # BatchNorm statistics over D_r ("train": the release's choice)
    bn_batch_size: int = 128
    # BatchNorm-pass batches run at once (sweep.sweep's bn_group): the same statistics up to
    # float rounding, fewer and larger kernels, bn_group times the pass's activation memory;
    # 1 until measured on a GPU.
    bn_group: int = 1
    eval_batch_size: int = 500
    strategy: str = "auto"  # sweep over t: "vmap", "map" or "auto" (per backend)
    chunk_size: int | None = None
    # Compile the two sweep programs in a background thread while the mask and the curve are
    # computed (one device only). Off by default until measured on a GPU (docs/benchmarks.md).
    precompile: bool = False
    # Evaluate the sweep with BatchNorm folded into the convolutions (sweep.folded): the same
    # accuracies up to float rounding, fewer bytes on GPUs with strategy "map" (not under
    # vmap); off by default until measured on a GPU.
    fold_bn: bool = False
    # PreResNet's 1x1 convolutions in the sweep as one kernel with the BatchNorm + ReLU before
    # them and the statistics after them (models.POINTWISE: "fused" is a Pallas kernel on
    # GPUs, XLA's ops elsewhere; sweep.sweep's pointwise): the same accuracies up to float
    # rounding, about 0.6 of the bytes compiled for an H100; "conv" until timed on a card.
    # "conv" keeps the model's own setting: a model made with ProblemConfig.pointwise="fused"
    # sweeps with the kernel either way.
    pointwise: str = "conv"
    # With the 1x1 kernel (here or the model's own, ProblemConfig.pointwise; run_mcu checks):
    # PreResNet's stride-1 3x3 convolutions in the sweep as one kernel with bn2 + ReLU before
    # them and bn3's statistics after them (models/conv3x3.py; sweep.sweep's conv3x3): the
    # same accuracies up to float rounding, 0.92 of the bytes of the bfloat16 sweep with
    # every other option, compiled for an H100; "conv" until timed on a card. "conv" keeps
    # the model's own setting (ProblemConfig.conv3x3).
    conv3x3: str = "conv"

    def __post_init__(self):
        if checks.integer("num_t", self.num_t) < 4:
            raise ValueError(f"num_t must be >= 4 for a cubic interpolant, got {self.num_t}")
        t_lo, t_hi = checks.fraction("t_lo", self.t_lo), checks.fraction("t_hi", self.t_hi)
        if not t_lo < t_hi:
            raise ValueError(f"need 0 <= t_lo < t_hi <= 1, got t_lo={self.t_lo}, t_hi={self.t_hi}")
        checks.choice("interpolation", self.interpolation, selection.INTERPOLATIONS)
        for name in ("include_test", "precompile", "fold_bn"):  # "no" would read as true
            checks.flag(name, getattr(self, name))
        checks.choice("bn_set", self.bn_set, BN_SETS)
        checks.choice("strategy", self.strategy, sweep.STRATEGIES)
        checks.integer("bn_batch_size", self.bn_batch_size, 1)
        checks.integer("bn_group", self.bn_group, 1)
        checks.integer("eval_batch_size", self.eval_batch_size, 1)
        checks.optional_integer("chunk_size", self.chunk_size, 1)
        checks.choice("pointwise", self.pointwise, POINTWISE)
        checks.choice("conv3x3", self.conv3x3, POINTWISE)


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """The parameter mask of section 2.3 (fractions of all parameter elements).

    ``kind="random"`` keeps whole tensors in a random order (from ``seed``) up to the same
    element budget ``k`` instead (the paper's Figure 2 baseline; ``k_r`` unused).
    """

    enabled: bool = True
    k: float = 0.5
    k_r: float = 0.1
    batch_size: int = 256
    kind: str = "parameter"
    # Of the random mask, and of the augmentation with ``augment`` (a constant like the
    # BatchNorm pass's: the same crops for every experiment seed unless it is changed).
    seed: int = 0
    # Gradients of the images with their training augmentation (random crop and flip on
    # CIFAR), as the release's mask reads its training loaders; False: the images as stored
    # (docs/design.md: the two masks of a CIFAR-10 ResNet-20 differ).
    augment: bool = False

    def __post_init__(self):
        checks.flag("enabled", self.enabled)
        checks.fraction("k", self.k)
        checks.fraction("k_r", self.k_r)
        checks.integer("batch_size", self.batch_size, 1)
        checks.choice("kind", self.kind, MASK_KINDS)
        checks.seed("seed", self.seed)
        if checks.flag("augment", self.augment) and (self.kind != "parameter"
                                                       or not self.enabled):
            raise ValueError(f"augment=True needs the gradient mask (kind='parameter', "
                             f"enabled=True), got kind={self.kind!r}, enabled={self.enabled!r}")


@dataclasses.dataclass
class MCUOutput:
    theta_c: Any
    mask: Any
    history: list[dict]
    sweep: sweep.SweepResult
    gaps: np.ndarray  # (T,) alignment gap per sweep point
    region: list[tuple[float, float]]
    t_star: float
    predicted_gap: float
    measured: dict[str, float]  # accuracies (percent) of theta(t*) measured for real
    measured_gap: float
    variables: dict  # theta(t*) with recomputed BatchNorm statistics
    minutes: dict[str, float]  # per phase: mask, curve, selection
    # Seconds of the curve-training epochs, compilation excluded (`CurveResult.epoch_seconds`).
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)
    # Every sample's true-class probability under theta(t*), per set of ``measured`` (from the
    # same compiled pass), so callers need not evaluate theta(t*) again (MIA); None when
    # theta(t*) was loaded from an earlier run's out_dir.
    measured_probs: dict[str, np.ndarray] | None = None

    def summary(self) -> dict:
        """The JSON-friendly part of the result (no arrays of parameters)."""
        return {
            "t_star": self.t_star,
            "predicted_gap": self.predicted_gap,
            "measured_gap": self.measured_gap,
            "measured": self.measured,
            "region": [list(r) for r in self.region],
            "sweep": {
                "ts": self.sweep.ts.tolist(),
                "acc": {k: v.tolist() for k, v in self.sweep.acc.items()},
                "gap": self.gaps.tolist(),
            },
            "history": self.history,
            "minutes": self.minutes,
            "epoch_seconds": self.epoch_seconds,
            "mask": masks.mask_summary(self.mask, self.theta_c),
        }


def eval_sets(train: Images, test: Images, split) -> dict[str, tuple[Images, Any]]:
    """The named sets every model is evaluated on: D_r, D_f, D_t (+ D_tr, D_tf class-wise)."""
    sets = {
        "retain": (train, split.retain),
        "forget": (train, split.forget),
        "test": (test, split.test),
    }
    if split.scenario == "class":
        sets["test_retain"] = (test, split.test_retain)
        sets["test_forget"] = (test, split.test_forget)
    return sets


def _gap(acc: dict, refs: dict, class_wise: bool, include_test: bool):
    """Alignment gap; class-wise: forget reference 0 and the test term on D_tr."""
    return selection.alignment_gap(
        acc["retain"],
        acc["forget"],
        acc["test_retain"] if class_wise else acc["test"],
        ref_train=refs["train"],
        ref_val=refs["val"],
        include_test=include_test,
        ref_forget=0.0 if class_wise else refs["val"],
    )


def compute_mask(model, theta_o: dict, train: Images, split, config: MaskConfig,
                 mesh=None) -> Any:
    """The section-2.3 mask from gradients at theta_o over all of D_r and D_f (data parallel
    over ``mesh`` when given: ``config.batch_size`` must be divisible by its device count;
    with ``config.augment`` of augmented images, drawn from ``config.seed``), or
    ``config.kind``'s random mask of the same budget (no gradients)."""
    if not config.enabled:
        return jax.tree.map(lambda _: True, theta_o["params"])
    _check_mask_budget(config, theta_o["params"])  # before the gradients where it can tell
    if config.kind == "random":
        mask = masks.random_mask(theta_o["params"], config.k, jax.random.PRNGKey(config.seed))
    else:
        g_r, g_f = masks.mask_gradients(
            model, theta_o, train, split.retain, split.forget, batch_size=config.batch_size,
            mesh=mesh, augment_key=jax.random.PRNGKey(config.seed) if config.augment else None,
        )
        mask = masks.parameter_mask(g_r, g_f, k=config.k, k_r=config.k_r)
    _check_mask_budget(config, theta_o["params"], mask)
    return mask


def _check_mask_budget(config: MaskConfig, params, mask=None) -> None:
    """ValueError naming mask.k and mask.k_r when the mask selects no tensor (curve training
    would have nothing to train): decided from the budgets alone without ``mask`` (k of
    fewer than one element, or k_r of every element), from ``mask`` once it is computed (the
    tensors that k_r drops depend on the gradients)."""
    if not config.enabled:
        return
    total = sum(math.prod(np.shape(p)) for p in jax.tree.leaves(params))
    gradient = config.kind == "parameter"
    if mask is None:
        empty = math.floor(config.k * total) == 0 or (
            gradient and math.floor(config.k_r * total) >= total)
    else:
        empty = not any(bool(v) for v in jax.tree.leaves(mask))
    if empty:
        budgets = (f"mask.k={config.k!r} and mask.k_r={config.k_r!r}" if gradient
                   else f"mask.k={config.k!r} (kind='random')")
        fix = "raise mask.k or lower mask.k_r" if gradient else "raise mask.k"
        raise ValueError(f"the {config.kind} mask with {budgets} selects no tensor of the "
                         f"{total:,} parameter elements, so curve training would have nothing "
                         f"to train: {fix} (or set mask.enabled=False)")


@runs.holds_folder("out_dir")
def run_mcu(
    model,
    theta_o: dict,
    theta_p: dict,
    train: Images,
    test: Images,
    split,
    refs: dict,
    key: jax.Array,
    mcu_config: MCUConfig | None = None,
    mask_config: MaskConfig | None = None,
    selection_config: SelectionConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    mesh=None,
) -> MCUOutput:
    """Runs MCU between theta_o and theta_p (variables dicts) on ``split``.

    ``mcu_config`` None is ``MCUConfig()``, the paper's CIFAR-10 random setting (10 epochs);
    ``mcu.paper_config(scenario, setting)`` gives the others (5 epochs class-wise).

    Only the parameters of theta_o and theta_p span the curve: every point's BatchNorm
    statistics are recomputed (section 2.5), so theta_p's ``batch_stats`` are checked
    (shapes, finite) but not used. The key, the variables, ``refs``, every index set of
    ``split`` that is read (D_f and the retain subset disjoint) and a mask budget that
    selects no tensor are checked before any work (ValueError naming what is wrong).

    ``refs`` are theta_o's reference accuracies in percent (keys "train", "val"), measured
    once in evaluation mode (see ``train.reference_accuracies``). With ``out_dir``, curve
    training checkpoints every epoch (and resumes), the mask is cached, and theta(t*) is
    exported to ``out_dir/model`` with the summary in ``out_dir/mcu.json``; a rerun reuses
    every finished part (mask, curve epochs, ``sweep.json``, the exported model).
    ``out_dir/theta_c`` holds the trained control point (``{"params"}``; metadata: the curve
    kind), to study the curve later without the training state. The folder
    is bound to the request (``out_dir/run.json``: the configs, a digest of the split, the
    references, the key and digests of theta_o's and theta_p's variables): a rerun whose
    request differs (other than speed-only settings such as ``progress`` or ``strategy``)
    raises ValueError instead of reusing those parts. ``out_dir/seconds.json`` keeps the
    seconds of the finished mask, sweep and t* phases, so a resumed run's ``minutes`` count
    every session. A ``mesh``
    (``sharding.make_mesh``) makes the mask gradients and curve training data parallel and
    the sweep t parallel.
    """
    mcu_config = mcu_config or MCUConfig()
    mask_config = mask_config or MaskConfig()
    selection_config = selection_config or SelectionConfig()
    checks.key("key", key)
    check_variables(model, theta_o, train.x.shape[1:], "theta_o")
    check_variables(model, theta_p, train.x.shape[1:], "theta_p")
    sweep.sweep_model(model, selection_config.pointwise, selection_config.conv3x3)  # checked
    check_refs(refs)
    check_curve_data(split.forget, split.retain_subset, train.num_examples)
    # Every set the mask, the BatchNorm passes and the sweep read, so that a bad index is
    # refused here rather than in the sweep, after the mask and the whole curve.
    for name, (images, idx) in eval_sets(train, test, split).items():
        check_indices(f"split.{name}", idx, images.num_examples, allow_empty=False)
    _check_mask_budget(mask_config, theta_o["params"])
    class_wise = split.scenario == "class"
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:  # its cached parts must come from this very request
        _bind(out, mcu_config, mask_config, selection_config, split, refs, key,
              theta_o, theta_p)
    clock = _PhaseSeconds(out)
    minutes = {}

    sc = selection_config
    ts = selection.uniform_ts(sc.num_t)
    bn_idx = split.retain if sc.bn_set == "retain" else np.arange(train.num_examples)
    template = theta_o.get("batch_stats", {})
    sets = eval_sets(train, test, split)
    compiling = None
    finished = out is not None and (out / "sweep.json").is_file() and checkpoint.model_exists(
        out / "model")
    if sc.precompile and mesh is None and not finished:
        p_o = theta_o["params"]  # theta_c has theta_o's shapes: the programs are the same
        compiling = _precompile(model, [p_o, p_o, theta_p["params"]], ts, template,
                                (train, bn_idx), sets, sc, mcu_config.curve)

    start = time.perf_counter()
    mask = _cached_mask(out, theta_o["params"]) if out is not None else None
    reused = 0.0  # seconds an earlier session spent on the cached results reused here
    if mask is None:
        mask = compute_mask(model, theta_o, train, split, mask_config, mesh)
        clock.record("mask", time.perf_counter() - start)
        if out is not None:
            masks.save(mask, out / "mask.json")
    else:
        reused = clock.earlier("mask")
    minutes["mask"] = (reused + time.perf_counter() - start) / 60.0
    log.info("run_mcu: mask done in %.1f s", 60 * minutes["mask"])

    curve_key, _ = jax.random.split(key)
    result = train_curve(
        model, theta_o, theta_p, train, split.retain_subset, split.forget, refs,
        mcu_config, curve_key, mask=mask, class_wise=class_wise,
        checkpoint_dir=out / "curve" if out is not None else None, mesh=mesh,
    )
    minutes["curve"] = result.minutes
    log.info("run_mcu: curve training done in %.1f s", 60 * minutes["curve"])
    if out is not None and not checkpoint.model_exists(out / "theta_c"):
        # The trained control point on its own, for analyses of the curve
        # (curves.point(curve, [theta_o, theta_c, theta_p], t)).
        checkpoint.save_model(out / "theta_c", {"params": result.theta_c},
                              {"curve": mcu_config.curve})

    start = time.perf_counter()
    if compiling is not None:
        compiling.join()  # a program still compiling is finished, not compiled twice
    points = [theta_o["params"], result.theta_c, theta_p["params"]]
    sw = _cached_sweep(out, ts) if out is not None else None
    reused = 0.0
    if sw is None:
        sw = sweep.sweep(model, points, ts, template, (train, bn_idx), sets,
                         **_sweep_options(sc, mesh, mcu_config.curve))
        clock.record("sweep", time.perf_counter() - start)
        if out is not None:  # a finished sweep survives a kill during selection
            checkpoint.write_json(
                out / "sweep.json",
                {"ts": sw.ts.tolist(), "acc": {k: v.tolist() for k, v in sw.acc.items()}},
            )
    else:
        reused += clock.earlier("sweep")
    log.info("run_mcu: sweep over %d t done in %.1f s", len(ts), time.perf_counter() - start)
    gaps = np.asarray(_gap(sw.acc, refs, class_wise, sc.include_test), np.float64)
    region = selection.effective_region(ts, gaps, kind=sc.interpolation)
    t_star, predicted = selection.optimal_t(ts, gaps, lo=sc.t_lo, hi=sc.t_hi,
                                            kind=sc.interpolation)
    exported = out is not None and checkpoint.model_exists(out / "model")
    measured_probs = None
    if exported:  # theta(t*) was already materialised, measured and saved
        variables, meta = checkpoint.load_model(out / "model")
        measured = meta["measured"]
        reused += clock.earlier("t_star")
    else:
        begin = time.perf_counter()
        variables, measured, measured_probs = _materialise(
            model, points, t_star, template, train, bn_idx, sets, sc, mesh, mcu_config.curve)
        clock.record("t_star", time.perf_counter() - begin)
    measured_gap = float(_gap(measured, refs, class_wise, sc.include_test))
    minutes["selection"] = (reused + time.perf_counter() - start) / 60.0
    log.info("run_mcu: selection (sweep and t*) done in %.1f s", 60 * minutes["selection"])

    output = MCUOutput(
        theta_c=result.theta_c, mask=mask, history=result.history, sweep=sw, gaps=gaps,
        region=region, t_star=float(t_star), predicted_gap=float(predicted),
        measured=measured, measured_gap=measured_gap, variables=variables, minutes=minutes,
        measured_probs=measured_probs, epoch_seconds=result.epoch_seconds,
    )
    if out is not None:
        if not exported:
            checkpoint.save_model(
                out / "model", variables, {"t_star": float(t_star), "measured": measured}
            )
        checkpoint.write_json(out / "mcu.json", output.summary())
    return output


# Settings that change how fast run_mcu runs, or its results only by float rounding: a rerun
# in the same out_dir may change them.
_FREE = (*runs.SPEED_FIELDS, "precompile", "strategy", "chunk_size", "eval_batch_size",
         "fold_bn", "bn_group", "pointwise", "conv3x3", *FREE_FIELDS)


def _bind(out: Path, mcu_config, mask_config, selection_config, split, refs, key,
          theta_o: dict, theta_p: dict) -> None:
    """Binds ``out`` to this request (configs, split, references, key and the two end
    points' variables) with a run record (``runs.RunDir``): a rerun with another request is
    refused instead of silently reusing the cached mask, curve checkpoints, sweep and model
    of the first one."""
    request = {
        "mcu": dataclasses.asdict(mcu_config), "mask": dataclasses.asdict(mask_config),
        "selection": dataclasses.asdict(selection_config),
        "split": {name: runs.digest(getattr(split, name))
                  for name in ("retain", "retain_subset", "forget", "test")},
        "scenario": split.scenario, "refs": {k: float(refs[k]) for k in ("train", "val")},
        "key": runs.key_list(key),
        "theta_o": runs.tree_digest(theta_o), "theta_p": runs.tree_digest(theta_p),
    }
    runs.RunDir(out).open(request, ignore=_FREE)


class _PhaseSeconds:
    """Seconds of run_mcu's mask, sweep and t* phases, kept in ``out/seconds.json`` (nothing
    without an ``out``). A phase's seconds are written before its result is saved, so a later
    session that reuses the result can add them to its own time (a resumed run's RTE)."""

    def __init__(self, out: Path | None):
        self.path = None if out is None else out / "seconds.json"
        exists = self.path is not None and self.path.is_file()
        remedy = "delete it to count this session's seconds only"
        self.saved = checkpoint.read_json(self.path, remedy) if exists else {}

    def earlier(self, phase: str) -> float:
        return float(self.saved.get(phase, 0.0))

    def record(self, phase: str, seconds: float) -> None:
        if self.path is not None:
            self.saved[phase] = float(seconds)
            checkpoint.write_json(self.path, self.saved)


def _sweep_options(sc: SelectionConfig, mesh, curve: str, at_one_t: bool = False) -> dict:
    """sweep.sweep's keywords for the sweep over t or (``at_one_t``) the one-t sweep that
    materialises t*; one place, so the background compilation builds the same programs."""
    options = dict(bn_batch_size=sc.bn_batch_size, eval_batch_size=sc.eval_batch_size,
                   strategy=sc.strategy, mesh=mesh, fold_bn=sc.fold_bn, curve=curve,
                   bn_group=sc.bn_group, pointwise=sc.pointwise, conv3x3=sc.conv3x3)
    if at_one_t:
        return {**options, "chunk_size": 1, "return_stats": True, "return_probs": True}
    return {**options, "chunk_size": sc.chunk_size}


def _precompile(model, points, ts, template, bn_set, sets: dict,
                sc: SelectionConfig, curve: str) -> threading.Thread:
    """Starts compiling the sweep over ``ts`` and the one-t sweep of :func:`_materialise`
    in a daemon thread (XLA releases the GIL while compiling); a failure only logs a
    warning, and the programs are then compiled when first called."""

    def work():
        begin = time.perf_counter()
        try:
            sweep.precompile(model, points, ts, template, bn_set, sets,
                             **_sweep_options(sc, None, curve))
            sweep.precompile(model, points, ts[:1], template, bn_set, sets,
                             **_sweep_options(sc, None, curve, at_one_t=True))
        except Exception as err:  # noqa: BLE001 - the foreground compiles instead
            log.warning("run_mcu: compiling the sweep in the background failed (%s: %s); it "
                        "is compiled when first used", type(err).__name__, err)
            return
        log.info("run_mcu: sweep programs compiled in the background in %.1f s",
                 time.perf_counter() - begin)

    thread = threading.Thread(target=work, name="mcu-jax-precompile", daemon=True)
    thread.start()
    return thread


def _materialise(model, points, t_star, template, train: Images, bn_idx, sets: dict,
                 sc: SelectionConfig, mesh, curve: str) -> tuple[dict, dict[str, float], dict]:
    """theta(t*) with recomputed BatchNorm statistics, its accuracies on ``sets`` and every
    sample's true-class probability.

    A sweep over the one point t* that also returns the statistics: one compiled program
    (BatchNorm pass and every set together) instead of one per pass and set size. The
    exported params are the curve's point (``curves.point``) at the float32 t the sweep
    used, so they are the model that was measured; ``measured`` has
    ``evaluation.evaluate_sets``' format (name -> accuracy in percent), the probabilities that of
    ``evaluation.outputs(...)["prob"]``.
    """
    t = np.float32(t_star)
    at = sweep.sweep(model, points, [t], template, (train, bn_idx), sets,
                     **_sweep_options(sc, mesh, curve, at_one_t=True))
    variables = {
        "params": curves.point(curve, points, at.ts[0]),
        "batch_stats": jax.tree.map(lambda a: jnp.asarray(a[0]), at.batch_stats),
    }
    measured = {name: float(at.acc[name][0]) for name in sets}
    return variables, measured, {name: at.probs[name][0] for name in sets}


def _cached_sweep(out: Path, ts: np.ndarray) -> sweep.SweepResult | None:
    """The sweep saved by an earlier run over the same t, if any."""
    path = out / "sweep.json"
    if not path.is_file():
        return None
    saved = checkpoint.read_json(path, "delete it to recompute the sweep")
    if not isinstance(saved.get("ts"), list) or not isinstance(saved.get("acc"), dict):
        raise ValueError(f"{path} is not a saved sweep (no 'ts' list and 'acc' object); "
                         "delete it to recompute the sweep")
    if not np.array_equal(np.asarray(saved["ts"], np.float32), np.asarray(ts, np.float32)):
        return None
    acc = {k: np.asarray(v, np.float64) for k, v in saved["acc"].items()}
    return sweep.SweepResult(ts=np.asarray(saved["ts"], np.float32), acc=acc, probs=None)


def _cached_mask(out: Path, params) -> Any:
    path = out / "mask.json"
    if not path.is_file():
        return None
    try:
        return masks.load(path, params)
    except ValueError as err:  # not JSON, or not a mask of theta_o
        raise ValueError(f"{err}; delete it to recompute the mask") from None
