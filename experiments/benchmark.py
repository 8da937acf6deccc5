"""Speed of mcu-jax on the standard MCU workload, through the library's own code paths.

Parts (each a row of the printed Markdown table):

- **curve step**: the MCU_beta curve-training step (``mcu.make_curve_step`` compiled by
  ``loop.make_runner``: ``lax.scan`` over ``--steps-per-call`` steps on accelerators, one
  jitted call per step on CPU), PreResNet-110 curve by default, batches of ``--batch-size``
  images of which about 1 in 11 is marked forget, SGD momentum 0.9, lr 0.01, optional
  parameter mask (``--mask``). ``--warmup`` untimed steps, then ``--steps`` timed steps.
  With ``--devices N`` (N > 1) the step is data parallel through the library's own path
  (``sharding.make_mesh(N)`` handed to ``loop.make_runner``: batch split over the devices,
  state and constants replicated), as ``mcu.train_curve(..., mesh=...)`` runs it.
- **sweep**: ``sweep.sweep`` over ``--num-t`` uniform t; per t BatchNorm recomputed over
  ``--sweep-images`` images and accuracy on the same images (2 x sweep-images
  image-forwards per t), with ``--strategy``/``--chunk-size`` (``--compare-strategies``
  adds one row each for map, vmap and vmap in chunks; a last chunk with fewer t is
  padded, so chunk sizes that divide --num-t compare fairly). With ``--devices N`` (N > 1)
  the sweep is t parallel (``sweep.sweep(..., mesh=...)``: every chunk of t split over the
  devices, padded to a multiple of N).
- **end-to-end** (``--end-to-end``): ``pipeline.run_mcu`` as in the paper's CIFAR-10
  protocol (mask over D_r and D_f, ``--epochs`` of curve training on 50% of D_r plus D_f,
  the sweep with BatchNorm over D_r and evaluation of D_r, D_f, D_t, and the selection of
  t*), given theta_o and theta_p; wall-clock time including compilation.

Data are random CIFAR-shaped uint8 images (timing only); theta_o and theta_p are
``init_variables`` with two keys, or trained models given as folders (``--theta-o``,
``--theta-p``: ``mcu-jax train`` / ``mcu-jax unlearn`` outputs). The step's mask comes from
gradients at theta_o over the random images, or from a file (``--mask runs/.../mask.json``, the
mask an MCU run computed on real data), so that the masked step can be timed with the mask a
trained model actually gets. "compile" is the first call's time minus the steady-state
time of the same amount of work. Peak device memory comes from the device's
``memory_stats()`` (cumulative over the process; "n/a" on CPU).

Examples::

    python experiments/benchmark.py                              # the standard GPU workload
    python experiments/benchmark.py --dtype bfloat16 --mask 0.1  # bf16, k = k_r = 0.1
    python experiments/benchmark.py --end-to-end --json out.json
    python experiments/benchmark.py --model resnet20 --skip-sweep --theta-o runs/c/theta_o \
        --theta-p runs/c/neggrad --mask runs/c/mcu/mask.json     # a real model's mask
    python experiments/benchmark.py --model resnet20 --steps 10 --num-t 4 --sweep-images 256 \
        --train-images 2048 --compare-strategies                 # small, CPU-sized
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import bn, checkpoint, curves, masks, mcu, pipeline, selection, sharding, sweep
from mcu_jax.data import Images, Split
from mcu_jax.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from mcu_jax.mcu import MCUConfig
from mcu_jax.models import check_variables, count_params, create, init_variables

COLUMNS = ("part", "setting", "compile (s)", "time", "throughput", "peak memory (MiB)")
#: Default input shape per model (H, W, C); anything else is CIFAR-shaped.
INPUT_SHAPES = {"cnn_small": (8, 8, 1), "vgg16_bn": (64, 64, 3), "vit_b16": (224, 224, 3)}
#: theta_o's reference accuracies handed to adaptive beta and the selection (the release's
#: config/baseline_results.yml for CIFAR-10 random forgetting); they do not affect speed.
REFS = {"train": 100.0, "val": 90.0, "test": 90.0}
FORGET_EVERY = 11  # about 1 in 11 images of a curve-training batch is a forget image


# ----------------------------------------------------------------------------- arguments


def parse_mask(text: str) -> tuple[float, float] | Path | None:
    """--mask: "none" -> None; "paper" -> (0.5, 0.1); "K" -> (K, K); "K,KR" -> (K, KR);
    "FILE.json" -> Path (a mask written by ``masks.save``, e.g. an MCU run's mask.json)."""
    if text.strip().endswith(".json"):
        return Path(text.strip())
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "paper":
        return (0.5, 0.1)
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(0.0 <= p <= 1.0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--mask: got {text!r}, expected none, paper, K or K,K_R with fractions in [0, 1], "
            "or a mask file ending in .json"
        )
    return (parts[0], parts[-1])


def model_text(args) -> str:
    """--fused-bn, --pointwise and --conv3x3 (the model's options) in a row's setting; with
    the fused 1x1 kernel, --fused-bn changes nothing and is not named."""
    if args.pointwise == "fused":
        return ", fused 1x1 kernel" + (", fused 3x3 kernel" if args.conv3x3 == "fused" else "")
    return ", fused BatchNorm" if args.fused_bn else ""


def model_of(args):
    """The benchmarked model (``--model``, ``--classes``, ``--dtype``, ``--fused-bn``,
    ``--pointwise``, ``--conv3x3``; ValueError for a model without the option)."""
    return create(args.model, args.classes, dtype=args.dtype, fused_bn=args.fused_bn,
                  pointwise=args.pointwise, conv3x3=args.conv3x3)


def combine_text(args) -> str:
    """--combine in the step's and end-to-end's setting, where it is not the default."""
    return ", curve point by XLA's per-tensor sums" if args.combine == "xla" else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time mcu-jax's curve-training step, t-sweep and end-to-end MCU phase.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w = p.add_argument_group("workload")
    w.add_argument("--model", default="preresnet110")
    w.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters stay float32)")
    w.add_argument("--fused-bn", action="store_true",
                   help="train-mode BatchNorm + ReLU with the hand-written backward pass "
                   "(the models' fused_bn, ProblemConfig.fused_bn; BatchNorm models only)")
    w.add_argument("--pointwise", default="conv", choices=("conv", "fused"),
                   help="fused: PreResNet's 1x1 convolutions as one kernel with the BatchNorm "
                   "+ ReLU before them and the statistics after them, and a backward kernel "
                   "(Pallas kernels on GPUs; the model's pointwise, ProblemConfig.pointwise: "
                   "step, sweep and end-to-end)")
    w.add_argument("--conv3x3", default="conv", choices=("conv", "fused"),
                   help="fused (needs --pointwise fused): PreResNet's stride-1 3x3 "
                   "convolutions as one kernel with bn2 + ReLU before them and bn3's "
                   "statistics after them, and a backward kernel (Pallas kernels on GPUs; the "
                   "model's conv3x3, ProblemConfig.conv3x3: step, sweep and end-to-end)")
    w.add_argument("--combine", default="auto", choices=("auto", "xla"),
                   help="how curve training forms the curve point's weight tensors "
                   "(MCUConfig.combine): auto = one Pallas kernel on NVIDIA GPUs, xla = XLA's "
                   "per-tensor sums (step and end-to-end)")
    w.add_argument("--mask", type=parse_mask, default="none",
                   metavar="{none,paper,K,K,K_R,FILE.json}",
                   help="parameter mask: none, paper (k=0.5, k_r=0.1), K (k=k_r=K), K,K_R, or "
                   "a mask file (masks.save; an MCU run folder's mask.json; step only)")
    w.add_argument("--theta-o", metavar="DIR", default=None,
                   help="theta_o from a model folder (mcu-jax train) instead of random init")
    w.add_argument("--theta-p", metavar="DIR", default=None,
                   help="theta_p from a model folder (mcu-jax unlearn) instead of random init")
    w.add_argument("--classes", type=int, default=10)
    w.add_argument("--image-size", type=int, default=None,
                   help="image height and width (default: 8 for cnn_small, else 32)")
    w.add_argument("--channels", type=int, default=None,
                   help="image channels (default: 1 for cnn_small, else 3)")
    w.add_argument("--devices", type=int, default=1,
                   help="devices: the curve step data parallel (batch split over them) and "
                   "the sweep t parallel (t split over them); end-to-end stays on one")
    w.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("curve step")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--train-images", type=int, default=27500,
                   help="images batches are drawn from (paper: 50%% of D_r plus D_f)")
    s.add_argument("--steps", type=int, default=200, help="timed steps")
    s.add_argument("--warmup", type=int, default=10, help="untimed steps after the first call")
    s.add_argument("--steps-per-call", type=int, default=50,
                   help="steps per compiled call (lax.scan length on accelerators)")
    s.add_argument("--scan", action="store_true",
                   help="run the steps of a call inside lax.scan on CPU too (the accelerator "
                   "code path; on CPU it is much slower, so only for checking that path)")
    s.add_argument("--mask-images", type=int, default=2048,
                   help="images of D_r and of D_f the step benchmark's mask gradients use")
    s.add_argument("--save-mask", metavar="FILE.json", default=None,
                   help="write the step's mask (masks.save), e.g. for cost_analysis.py --mask")
    s.add_argument("--skip-step", action="store_true", help="do not time the curve step")
    e = p.add_argument_group("sweep")
    e.add_argument("--num-t", type=int, default=20)
    e.add_argument("--sweep-images", type=int, default=6000,
                   help="images for the BatchNorm pass and for accuracy, per t")
    e.add_argument("--bn-batch-size", type=int, default=128)
    e.add_argument("--eval-batch-size", type=int, default=500)
    e.add_argument("--bn-group", type=int, default=1,
                   help="BatchNorm-pass batches run at once (sweep.sweep's bn_group)")
    e.add_argument("--strategy", default="auto", choices=sweep.STRATEGIES)
    e.add_argument("--chunk-size", type=int, default=None, help="t per compiled chunk")
    e.add_argument("--compare-strategies", action="store_true",
                   help="time the sweep with map, vmap and vmap in chunks (--chunk-size, "
                   "default the largest divisor of --num-t up to a quarter of it)")
    e.add_argument("--repeats", type=int, default=1, help="timed sweeps; the best is reported")
    e.add_argument("--skip-sweep", action="store_true", help="do not time the sweep")
    e.add_argument("--fold-bn", action="store_true",
                   help="evaluate with BatchNorm folded into the convolutions "
                   "(sweep fold_bn, SelectionConfig.fold_bn; end-to-end too)")
    x = p.add_argument_group("end-to-end MCU phase")
    x.add_argument("--end-to-end", action="store_true", help="also time pipeline.run_mcu")
    x.add_argument("--retain", type=int, default=45000, help="|D_r|")
    x.add_argument("--forget", type=int, default=5000, help="|D_f|")
    x.add_argument("--test", type=int, default=10000, help="test set (10%% D_v, rest D_t)")
    x.add_argument("--epochs", type=int, default=10, help="curve-training epochs")
    x.add_argument("--precompile", action="store_true",
                   help="compile the sweep programs in a background thread during the mask "
                   "and curve training (SelectionConfig.precompile)")
    o = p.add_argument_group("output")
    o.add_argument("--profile", metavar="DIR", default=None,
                   help="write a jax.profiler trace of each timed region (not the compiling "
                   "first calls) to DIR/<region>; summarize with experiments/profile_summary.py")
    o.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ("classes", "devices", "batch_size", "train_images", "steps", "steps_per_call",
                "mask_images", "num_t", "sweep_images", "bn_batch_size", "eval_batch_size",
                "bn_group", "repeats", "retain", "forget", "test", "epochs")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.conv3x3 != "conv" and args.pointwise == "conv":
        parser.error(f"--conv3x3 {args.conv3x3} needs --pointwise fused (the 3x3 kernel reads "
                     "the 1x1 kernel's output)")
    try:
        model_of(args)
    except ValueError as e:
        options = (f"{' --fused-bn' if args.fused_bn else ''}"
                   f"{f' --pointwise {args.pointwise}' if args.pointwise != 'conv' else ''}"
                   f"{f' --conv3x3 {args.conv3x3}' if args.conv3x3 != 'conv' else ''}")
        parser.error(f"--model {args.model}{options}: {e}")
    if isinstance(args.mask, Path):
        if not args.mask.is_file():
            parser.error(f"--mask: no mask file at {str(args.mask)!r}")
        if args.end_to_end:
            parser.error("--mask FILE times the step only; --end-to-end computes its own mask "
                         "(give it none, paper, K or K,K_R)")
    for name in ("theta_o", "theta_p"):
        folder = getattr(args, name)
        if folder is not None and not checkpoint.model_exists(folder):
            parser.error(f"--{name.replace('_', '-')}: no finished model in {folder!r} "
                         "(expected a folder written by mcu-jax train or unlearn)")
    if args.num_t < 2:
        parser.error(f"--num-t must be >= 2, got {args.num_t}")
    if args.end_to_end and args.num_t < 4:
        parser.error(f"--end-to-end needs --num-t >= 4 (cubic interpolant), got {args.num_t}")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.devices > len(jax.devices()):
        parser.error(f"--devices {args.devices}: only {len(jax.devices())} device(s) present")
    if args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} is not divisible by --devices "
                     f"{args.devices}")
    if args.batch_size > args.train_images:
        parser.error(f"--batch-size {args.batch_size} exceeds --train-images "
                     f"{args.train_images}")
    if args.sweep_images > args.train_images and not args.skip_sweep:
        parser.error(f"--sweep-images {args.sweep_images} exceeds --train-images "
                     f"{args.train_images}")
    return args


# ----------------------------------------------------------------------------- helpers


def input_shape(args) -> tuple[int, int, int]:
    h, w, c = INPUT_SHAPES.get(args.model, (32, 32, 3))
    if args.image_size is not None:
        h = w = args.image_size
    if args.channels is not None:
        c = args.channels
    return (h, w, c)


def default_chunk(num_t: int) -> int:
    """The largest divisor of ``num_t`` up to a quarter of it (no padded t in any chunk)."""
    return max(d for d in range(1, max(1, num_t // 4) + 1) if num_t % d == 0)


def synthetic_images(n: int, shape, classes: int, rng: np.random.Generator) -> Images:
    """Random uint8 images with random labels and CIFAR-10 statistics (crop+flip for 32x32)."""
    h, w, c = shape
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    y = rng.integers(0, classes, size=n)
    mean = (CIFAR10_MEAN * c)[:c]
    std = (CIFAR10_STD * c)[:c]
    augment = "crop_flip" if (h, w) == (32, 32) else "none"
    return Images.from_arrays(x, y, mean, std, augment)


def peak_mib() -> float | None:
    """Peak bytes in use on device 0 (cumulative over the process), None where unknown."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call
        stats = None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def initial_variables(folder: str | None, model, key, shape, name: str) -> dict:
    """The variables in model folder ``folder`` (checked against ``model``), or a random
    initialisation from ``key`` when there is none."""
    if folder is None:
        return init_variables(model, key, (1, *shape))
    variables, _ = checkpoint.load_model(folder)
    variables = jax.tree.map(jnp.asarray, variables)
    check_variables(model, variables, (1, *shape), name=name)
    return variables


def weights_text(args) -> str:
    """Where theta_o and theta_p came from, for the table's header."""
    given = [f"{name} from {folder}" for name, folder in
             (("theta_o", args.theta_o), ("theta_p", args.theta_p)) if folder is not None]
    return "; " + ", ".join(given) if given else ""


def describe_mask(mask) -> str:
    if mask is None:
        return "none"
    if isinstance(mask, Path):
        return f"from {mask}"
    return f"k={mask[0]:g}, k_r={mask[1]:g}"


def build_mask(model, theta_o, images: Images, is_forget: np.ndarray, mask, n: int, key):
    """The section-2.3 mask from gradients at theta_o over ``n`` retain and ``n`` forget images
    (all True for ``mask`` None; read from the file for a Path)."""
    if mask is None:
        return jax.tree.map(lambda _: True, theta_o["params"])
    if isinstance(mask, Path):
        return masks.load(mask, theta_o["params"])
    retain_idx = np.flatnonzero(~is_forget)[:n]
    forget_idx = np.flatnonzero(is_forget)[:n]
    g_r, g_f = masks.mask_gradients(model, theta_o, images, retain_idx, forget_idx)
    return masks.parameter_mask(g_r, g_f, k=mask[0], k_r=mask[1])


def curve_setup(model, theta_o, theta_p, images: Images, is_forget, mask, config: MCUConfig,
                mesh=None, unrolled=None):
    """State, constants and runner of curve training, set up as ``mcu.train_curve`` does
    (with a ``mesh``: state and constants replicated on it, the runner data parallel)."""
    theta_c = curves.midpoint(theta_o["params"], theta_p["params"])
    state, consts, runner = mcu.setup_curve(
        model, theta_o, theta_p, theta_c, mask, images, is_forget,
        (REFS["train"], REFS["val"]), config, mesh, unrolled,
    )
    if mesh is not None:
        state, consts = sharding.replicate((state, consts), mesh)
    return state, consts, runner


def device_mesh(args):
    """The mesh of ``--devices`` (None for one device: the plain single-device path)."""
    return sharding.make_mesh(args.devices) if args.devices > 1 else None


@contextlib.contextmanager
def timed_region(name: str, profile_dir: str | None):
    """A named region of the trace; with ``profile_dir``, also traced by jax.profiler into its
    own folder (``profile_dir/<name with _ for />``), so compilation and warm-up stay out of
    the trace and it stays small enough to copy back from a GPU machine."""
    if profile_dir is None:
        with jax.profiler.TraceAnnotation(name):
            yield
        return
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # device and XLA activity only: a much smaller trace
    jax.profiler.start_trace(os.path.join(profile_dir, name.replace("/", "_")),
                             profiler_options=options)
    try:
        with jax.profiler.TraceAnnotation(name):
            yield
    finally:
        jax.profiler.stop_trace()


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _row(part, setting, compile_s, time_text, throughput_text, peak, **numbers) -> dict:
    # Progress on stderr, so a run cut short still shows what it measured.
    print(f"[benchmark] {part}: {setting}: {time_text}, {throughput_text}", file=sys.stderr,
          flush=True)
    return {
        "part": part,
        "setting": setting,
        "compile (s)": "-" if compile_s is None else f"{compile_s:.2f}",
        "time": time_text,
        "throughput": throughput_text,
        "peak memory (MiB)": _fmt(peak, 4),
        "numbers": {"compile_s": compile_s, "peak_mib": peak, **numbers},
    }


# ----------------------------------------------------------------------------- parts


def mcu_config(args, **fields) -> MCUConfig:
    """Curve training's config for the step and end-to-end parts: ``--batch-size``,
    ``--steps-per-call``, ``--combine``, no progress bars, and ``fields``."""
    return MCUConfig(batch_size=args.batch_size, steps_per_call=args.steps_per_call,
                     combine=args.combine, progress=False, **fields)


def bench_step(args, model, theta_o, theta_p, images: Images, is_forget, mask, key) -> dict:
    config = mcu_config(args, lr=0.01, momentum=0.9)
    mesh = device_mesh(args)
    state, consts, runner = curve_setup(model, theta_o, theta_p, images, is_forget, mask,
                                        config, mesh, unrolled=False if args.scan else None)
    call = min(args.steps_per_call, args.steps)
    warm_calls = math.ceil(args.warmup / call)
    timed_calls = math.ceil(args.steps / call)
    total = (1 + warm_calls + timed_calls) * call
    rng = np.random.default_rng(args.seed + 1)
    n = images.num_examples
    batches = np.stack([rng.choice(n, args.batch_size, replace=False) for _ in range(total)])
    batches = jnp.asarray(batches.astype(np.int32)).reshape(-1, call, args.batch_size)
    keys = jax.random.split(key, total).reshape(-1, call, *jax.random.split(key, 1).shape[1:])
    if mesh is not None:  # laid out once, so the runner's own placement is a no-op
        batches = sharding.place(batches, sharding.batch_sharding(mesh, ndim=3))
        keys = sharding.replicate(keys, mesh)
    # The runner donates its state: give it a copy.
    state = jax.tree.map(jnp.array, state)

    def run(state, i):
        state, metrics = runner(state, consts, batches[i], keys[i])
        return jax.block_until_ready((state, metrics))[0]

    with jax.profiler.TraceAnnotation("curve_step/first_call"):
        t0 = time.perf_counter()
        state = run(state, 0)
        first = time.perf_counter() - t0
    with jax.profiler.TraceAnnotation("curve_step/warmup"):
        for i in range(1, 1 + warm_calls):
            state = run(state, i)
    with timed_region("curve_step/timed", args.profile):
        t0 = time.perf_counter()
        for i in range(1 + warm_calls, 1 + warm_calls + timed_calls):
            state, _ = runner(state, consts, batches[i], keys[i])
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - t0
    steps = timed_calls * call
    step_s = elapsed / steps
    compile_s = max(first - call * step_s, 0.0)
    frac = masks.trained_fraction(mask, theta_o["params"])
    setting = (f"{args.model} {args.dtype}{model_text(args)}{combine_text(args)}, "
               f"batch {args.batch_size}, "
               f"mask {describe_mask(args.mask)} ({100 * frac:.1f}% of elements trained), "
               f"{steps} steps")
    if args.devices > 1:
        setting += f", {args.devices} devices"
    peak = peak_mib()
    return _row(
        "curve step", setting, compile_s, f"{1e3 * step_s:.2f} ms/step",
        f"{_fmt(args.batch_size / step_s)} img/s", peak,
        step_ms=1e3 * step_s, images_per_s=args.batch_size / step_s, steps=steps,
        trained_fraction=frac, first_call_s=first,
    )


def bench_sweep(args, model, points, template, images: Images, strategy, chunk) -> dict:
    idx = np.arange(args.sweep_images)
    ts = selection.uniform_ts(args.num_t)

    def once():
        return sweep.sweep(
            model, points, ts, template, (images, idx), {"eval": (images, idx)},
            bn_batch_size=args.bn_batch_size, eval_batch_size=args.eval_batch_size,
            strategy=strategy, chunk_size=chunk, mesh=mesh, fold_bn=args.fold_bn,
            bn_group=args.bn_group,
        )

    mesh = device_mesh(args)
    if mesh is not None:  # replicated once, outside the timing, as the curve step's data
        points, template, images = sharding.replicate((points, template, images), mesh)
    resolved = sweep.resolve_strategy(strategy)
    with jax.profiler.TraceAnnotation(f"sweep/{resolved}/first_call"):
        t0 = time.perf_counter()
        once()  # returns host arrays: synchronous
        first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        with timed_region(f"sweep/{resolved}/timed", args.profile):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    best = min(times)
    forwards = args.num_t * 2 * args.sweep_images
    label = resolved if strategy == resolved else f"{resolved} ({strategy})"
    chunk_text = f", chunks of {chunk}" if chunk is not None else ""
    setting = (f"{args.num_t} t x ({args.sweep_images:,} BN + {args.sweep_images:,} eval "
               f"images), strategy {label}{chunk_text}")
    if mesh is not None:
        setting += f", {args.devices} devices (t parallel)"
    if args.fold_bn:
        setting += ", BN folded for evaluation"
    if args.bn_group > 1:
        passes = bn.describe_pass(args.sweep_images, args.bn_batch_size, args.bn_group)
        setting += f", BN pass: {passes}"
    setting += model_text(args)
    return _row(
        "sweep", setting, max(first - best, 0.0), f"{best:.3g} s",
        f"{_fmt(forwards / best)} img-fwd/s", peak_mib(),
        sweep_s=best, sweep_times_s=times, image_forwards_per_s=forwards / best,
        image_forwards=forwards, strategy=resolved, chunk_size=chunk, first_call_s=first,
    )


def bench_end_to_end(args, model, theta_o, theta_p, shape, key) -> dict:
    rng = np.random.default_rng(args.seed + 2)
    n_train = args.retain + args.forget
    train = synthetic_images(n_train, shape, args.classes, rng)
    test = synthetic_images(args.test, shape, args.classes, rng)
    forget = np.sort(rng.choice(n_train, args.forget, replace=False)).astype(np.int64)
    retain = np.setdiff1d(np.arange(n_train), forget).astype(np.int64)
    subset = np.sort(rng.choice(retain, max(1, round(0.5 * retain.size)), replace=False))
    n_val = max(1, round(0.1 * args.test)) if args.test > 1 else 0
    empty = np.zeros(0, np.int64)
    split = Split(
        forget=forget, retain=retain, retain_subset=subset.astype(np.int64),
        val=np.arange(n_val, dtype=np.int64), test=np.arange(n_val, args.test, dtype=np.int64),
        test_forget=empty, test_retain=empty, scenario="random", forget_class=None,
        seed=args.seed,
    )
    curve_config = mcu_config(args, epochs=args.epochs)
    mask_config = (pipeline.MaskConfig(enabled=False) if args.mask is None
                   else pipeline.MaskConfig(k=args.mask[0], k_r=args.mask[1]))
    # --pointwise and --conv3x3 are the model's settings (model_of), which the sweep keeps
    sel = pipeline.SelectionConfig(num_t=args.num_t, strategy=args.strategy,
                                   chunk_size=args.chunk_size,
                                   bn_batch_size=args.bn_batch_size,
                                   eval_batch_size=args.eval_batch_size,
                                   precompile=args.precompile, fold_bn=args.fold_bn,
                                   bn_group=args.bn_group)
    # run_mcu logs each finished phase: a run stopped by a time limit still shows them.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[benchmark] end-to-end: %(message)s"))
    level, propagate = pipeline.log.level, pipeline.log.propagate
    pipeline.log.addHandler(handler)
    pipeline.log.setLevel(logging.INFO)
    pipeline.log.propagate = False  # printed once, here, whatever the root logger does
    try:
        with jax.profiler.TraceAnnotation("end_to_end"):
            t0 = time.perf_counter()
            out = pipeline.run_mcu(model, theta_o, theta_p, train, test, split, REFS, key,
                                   curve_config, mask_config, sel)
            total = time.perf_counter() - t0
    finally:
        pipeline.log.removeHandler(handler)
        pipeline.log.setLevel(level)
        pipeline.log.propagate = propagate
    phases = {k: 60.0 * v for k, v in out.minutes.items()}
    pool = subset.size + forget.size
    steps = args.epochs * (pool // args.batch_size if pool >= args.batch_size
                           else math.ceil(pool / args.batch_size))
    setting = (f"{args.model} {args.dtype}{model_text(args)}"
               f"{combine_text(args)}, "
               f"D_r {args.retain:,}, "
               f"D_f {args.forget:,}, test {args.test:,}, {args.epochs} epochs ({steps} steps), "
               f"mask {describe_mask(args.mask)}, "
               f"{args.num_t} t{', sweep compiled in the background' if args.precompile else ''}"
               f"{', BN folded for evaluation' if args.fold_bn else ''}")
    time_text = (f"{total:.3g} s (mask {phases['mask']:.3g}, curve {phases['curve']:.3g}, "
                 f"selection {phases['selection']:.3g}; compile included)")
    return _row(
        "end-to-end", setting, None, time_text, f"{steps / phases['curve']:.3g} steps/s (curve)",
        peak_mib(), total_s=total, phases_s=phases, steps=steps, t_star=out.t_star,
    )


# ----------------------------------------------------------------------------- output


def header(args, argv) -> list[str]:
    devs = jax.devices()
    kind = devs[0].device_kind
    cpu = f", {os.cpu_count()} CPU cores" if devs[0].platform == "cpu" else ""
    command = "python experiments/benchmark.py " + " ".join(shlex.quote(a) for a in argv)
    return [
        "# mcu-jax benchmark",
        "",
        f"- device: {kind} ({devs[0].platform}, {len(devs)} present, {args.devices} used{cpu})",
        f"- jax {jax.__version__}, python {platform.python_version()}, "
        f"date {datetime.date.today().isoformat()}",
        f"- command: `{command.strip()}`",
    ]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
    """Runs the selected parts; returns {"rows": [...], "params": ...} (rows as printed)."""
    shape = input_shape(args)
    model = model_of(args)
    k_o, k_p, k_step, k_e2e = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    theta_o = initial_variables(args.theta_o, model, k_o, shape, "--theta-o")
    theta_p = initial_variables(args.theta_p, model, k_p, shape, "--theta-p")
    rng = np.random.default_rng(args.seed)
    images = synthetic_images(args.train_images, shape, args.classes, rng)
    is_forget = np.arange(args.train_images) % FORGET_EVERY == 0
    rows = []
    if not args.skip_step:
        mask = build_mask(model, theta_o, images, is_forget, args.mask, args.mask_images,
                          k_step)
        if args.save_mask is not None:
            masks.save(mask, args.save_mask)
        rows.append(bench_step(args, model, theta_o, theta_p, images, is_forget, mask,
                               k_step))
    if not args.skip_sweep:
        p_o, p_p = theta_o["params"], theta_p["params"]
        points = [p_o, curves.midpoint(p_o, p_p), p_p]
        template = theta_o["batch_stats"]
        if args.compare_strategies:
            chunk = args.chunk_size or default_chunk(args.num_t)
            plans = [("map", None), ("vmap", None), ("vmap", chunk)]
        else:
            plans = [(args.strategy, args.chunk_size)]
        for strategy, chunk in plans:
            rows.append(bench_sweep(args, model, points, template, images, strategy, chunk))
    if args.end_to_end:
        rows.append(bench_end_to_end(args, model, theta_o, theta_p, shape, k_e2e))
    return {"rows": rows, "params": count_params(theta_o["params"]), "input_shape": shape}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    result = run(args)
    head = header(args, argv)
    head.append(f"- model {args.model}: {result['params']:,} parameters, input "
                f"{'x'.join(map(str, result['input_shape']))}; random data (timing only)"
                f"{weights_text(args)}")
    table = markdown_table(result["rows"])
    print("\n".join(head) + "\n\n" + table, flush=True)
    out = {
        "meta": {
            "device": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
            "devices_used": args.devices,
            "jax": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "command": argv,
            "params": result["params"],
        },
        "args": {k: v for k, v in vars(args).items()},
        "rows": result["rows"],
        "table": table,
    }
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
