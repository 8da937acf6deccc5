"""XLA's own estimate of the arithmetic and memory traffic of mcu-jax's programs (operand and
output bytes of each fusion of the compiled program, on the backend it is compiled for).

usage: python experiments/cost_analysis.py [--model preresnet110] [--batch-size 128]
                                           [--dtype float32] [--eval-batch 500] [--num-t 20]
                                           [--sweep-images 6000] [--flops-per-s 4e14]
                                           [--bytes-per-s 3e12] [--mask MASK.json]
                                           [--sweep-program STRATEGY:BN_GROUP:EVAL_BATCH[:FLAGS]]
                                           [--kernel-us 3.5] [--devices 1]
                                           [--gpu-target experiments/gpu_targets/h100.pbtxt]

Compiles, without running, (1) one MCU_beta curve-training step (the step ``mcu.train_curve``
runs, batch ``--batch-size``), (2) a train-mode forward pass (BatchNorm with batch statistics,
as in the sweep's BatchNorm pass), (3) an eval-mode forward pass and (4) the eval-mode pass
with BatchNorm folded into the convolutions (``models.folded``; the sweep's ``fold_bn``), and
prints for each the FLOPs and bytes accessed from ``compiled.cost_analysis()``, per step or
per image, with the times they take at the given rates (defaults: about an H100's TF32 matrix
rate and its measured copy bandwidth), plus the sums for a t-sweep of ``--num-t`` t over
``--sweep-images`` images (a train-mode and an eval-mode pass per image and t). For the eval
passes it also counts the convolutions the GPU compiler turned into cuDNN calls with a fused
bias/ReLU epilogue. The counts come from the backend the program is compiled for (its fusion
decides the bytes); on CPU they estimate a GPU's. For a model with BatchNorm it also
compiles the step and the train-mode pass with the models' ``fused_bn`` (BatchNorm + ReLU
with a hand-written backward pass, ``models/batchnorm.py``), and for PreResNet the step and
both forward passes with its 1x1 convolutions as the fused kernel of ``models/pointwise.py``
(its Pallas kernels, forward and backward, when compiled for a GPU), then the step with
its stride-1 3x3 convolutions as the kernels of ``models/conv3x3.py`` too. With ``--mask`` (a
mask saved by ``masks.save``, e.g. ``mcu-jax mask`` or an MCU run's ``mask.json``) it also
compiles the step with that mask, whose frozen tensors get no weight gradient (also with
``fused_bn`` and with the fused kernels). With ``--sweep-program`` (repeatable) it also
compiles the sweep's own program (``sweep.chunk_program``) for ``--num-t`` t over
``--sweep-images`` images with that strategy (vmap or map over t), ``bn_group`` and
evaluation batch (BatchNorm batches of ``--batch-size``, as the step's; ``:fold``: BatchNorm
folded for evaluation; ``:pointwise``: PreResNet's fused 1x1 kernel in both passes;
``:conv3x3``: with it, the fused 3x3 kernel of ``models/conv3x3.py``), and
estimates its time by two terms: the bytes at ``--bytes-per-s`` and ``--kernel-us`` microseconds a
kernel. Prints a Markdown table.

Every row also counts the program's kernels: the instructions of its compiled program that
launch work (fusions, library calls, copies; a loop's once per iteration), and how many of
them touch under 1 MB each. On a GPU each costs a launch and a few microseconds however
little it does. Each program compiled on its own (not the data-parallel step) also shows its
build time on this host, from cleared caches as a new process pays it: tracing + lowering
(jax, Pallas' kernels to Triton's IR) and XLA's compilation (for a GPU target, without
autotuning).

``--devices N`` compiles the step rows as the data-parallel step of ``mcu.train_curve(...,
mesh=)`` on N devices (the batch split over them; bytes and kernels per device, and the
note counts the all-gathers and all-reduces): N GPUs of ``--gpu-target``, or the CPU's host
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``).

``--gpu-target FILE`` compiles for a GPU described by an XLA target config (the H100's is
``experiments/gpu_targets/h100.pbtxt``) without one: a deviceless compilation on this
machine, through ``jax.experimental.topologies``, which needs JAX's CUDA plugin installed
(``pip install -e ".[cuda13]"``) but no GPU or driver. The GPU compiler makes the fusion
decisions, so the kernel counts and bytes are the card's. Such a program has no
``cost_analysis()``: its bytes are the operand and output bytes of each kernel read off the
compiled HLO, and its FLOPs are not given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcu_jax import bn, curves, masks, mcu, sharding, sweep
from mcu_jax.mcu import MCUConfig
from mcu_jax.models import create, folded, init_variables, with_conv3x3, with_pointwise

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling benchmark.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import INPUT_SHAPES, synthetic_images  # noqa: E402 - the benchmark's own data

TINY_BYTES = 1_000_000  # a kernel touching fewer bytes than this is launch-bound on a GPU
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
              "opt-barrier", "add-dependency", "partition-id", "replica-id"}
_INSTRUCTION = re.compile(r"\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)")


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape (``f32[128,3,3,16]``) in an HLO type string."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _ITEM_BYTES:
            total += _ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """A printed HLO module's computations (name -> instruction lines) and its entry's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            current = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _operands(args: str) -> list[str]:
    """Operand names of an instruction, from the text after its opening parenthesis."""
    depth = 1
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", args[:i])
    raise ValueError(f"unbalanced operand list: {args[:80]!r}")


def _sliced_reads(lines: list[str]) -> dict[int, int]:
    """For a fused computation: the parameters (by number) that it reads only through
    slices, with the bytes of those slices."""
    numbers, sizes, uses = {}, {}, {}
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        label, out_type, op, rest = m.groups()
        sizes[label] = _shape_bytes(out_type)
        if op == "parameter":
            numbers[label] = int(re.match(r"\d+", rest).group(0))
            continue
        for operand in _operands(rest):
            uses.setdefault(operand, []).append((op, label))
    return {number: sum(sizes[user] for _, user in uses[label])
            for label, number in numbers.items()
            if uses.get(label) and all(op in ("slice", "dynamic-slice")
                                       for op, _ in uses[label])}


def hlo_kernels(hlo: str) -> list[tuple[str, int]]:
    """``(opcode, operand + output bytes)`` of each instruction of a compiled HLO module that
    launches work (not parameters, constants, tuples, bitcasts), in its entry computation and
    in the bodies of its loops (once per iteration where XLA knows the trip count, else once)
    and calls; fusions and custom calls are named with their kind or target. Each operand's
    whole size counts once, or, where a fusion reads it only through slices, the slices'
    sizes: an estimate, which misses re-reads."""
    comps, entry = _computations(hlo)

    def walk(name: str) -> list[tuple[str, int]]:
        sizes: dict[str, int] = {}
        kernels = []
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            label, out_type, op, rest = m.groups()
            sizes[label] = _shape_bytes(out_type)
            if op in _NO_KERNEL:
                continue
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                kernels += walk(body) * (int(trips.group(1)) if trips else 1)
                continue
            if op in ("call", "conditional"):  # every branch of a conditional counts
                called = re.findall(r"(?:to_apply|true_computation|false_computation)="
                                    r"%([\w.\-]+)", rest)
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                called += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                for computation in called:
                    kernels += walk(computation)
                continue
            kind = re.search(r'custom_call_target="([^"]+)"|kind=(\w+)', rest)
            fused = re.search(r"calls=%([\w.\-]+)", rest) if op == "fusion" else None
            sliced = _sliced_reads(comps[fused.group(1)]) if fused else {}
            op = f"{op}:{kind.group(1) or kind.group(2)}" if kind else op
            kernels.append((op, sizes[label] + sum(min(sizes.get(o, 0), sliced.get(i, math.inf))
                                                   for i, o in enumerate(_operands(rest)))))
        return kernels

    return walk(entry)


def _cost(compiled, kernels: list[tuple[str, int]] | None = None) -> dict:
    """FLOPs and bytes (XLA's cost analysis; without one, as for a deviceless GPU
    compilation, no FLOPs and the kernels' bytes from the HLO) and the kernel counts;
    ``kernels`` is the program's :func:`hlo_kernels` where the caller has it already."""
    kernels = hlo_kernels(compiled.as_text()) if kernels is None else kernels
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost:
        flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    else:
        flops, nbytes = math.nan, float(sum(b for _, b in kernels))
    return {"flops": flops, "bytes": nbytes, "kernels": len(kernels),
            "tiny": sum(b < TINY_BYTES for _, b in kernels)}


def _share(row: dict, plain: dict, plain_name: str) -> str:
    """``row``'s FLOPs, bytes and kernels against ``plain``'s (the same program without the
    row's change, called ``plain_name``)."""
    parts = ([] if math.isnan(row["flops"])
             else [f"{row['flops'] / plain['flops']:.2f} of {plain_name} FLOPs"])
    parts.append(f"{row['bytes'] / plain['bytes']:.2f} of {'its' if parts else plain_name} "
                 "bytes")
    parts.append(f"{row['kernels'] - plain['kernels']:+d} kernels")
    return ", ".join(parts)


def target_device(config_file: str, count: int = 1):
    """A deviceless GPU described by an XLA target config (``GpuTargetConfigProto`` text),
    for compiling without the card; needs JAX's CUDA plugin, not a GPU. ``count`` > 1: a
    list of that many such GPUs on one host."""
    from jax.experimental import topologies

    text = Path(config_file).read_text()
    try:
        topology = topologies.get_topology_desc("target", "cuda", target_config=text,
                                                topology=f"1x1x{count}")
    except Exception as err:  # noqa: BLE001 - the plugin's errors have no common type
        raise SystemExit(f"cannot compile for {config_file} without a GPU: {err} (this "
                         "needs JAX's CUDA plugin: pip install -e '.[cuda13]')") from err
    return topology.devices[0] if count == 1 else list(topology.devices)


def _shaped(tree, place):
    """``tree``'s arrays as ``jax.ShapeDtypeStruct``s laid out with ``place``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        np.shape(a), a.dtype if hasattr(a, "dtype") else np.result_type(a), sharding=place,
        weak_type=getattr(a, "weak_type", False)), tree)


def _compile(fn, *args, device=None) -> tuple:
    """``(compiled, {"build": (trace + lower seconds, compile seconds)})``: ``jax.jit(fn)``
    compiled for ``args``, for their device or for ``device`` (e.g. :func:`target_device`)
    from their shapes alone, with jax's caches cleared first, so that the times are what a
    new process pays for this program (a row's kernels are not reused from an earlier
    row's). With ``device``, traced under ``jax.default_device(device)``, as on that GPU's
    host (``kernel_impl.default_device_is_nvidia``)."""
    if device is not None:
        args = _shaped(args, jax.sharding.SingleDeviceSharding(device))
    jax.clear_caches()
    start = time.perf_counter()
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        lowered = jax.jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"build": (lowered_at - start, time.perf_counter() - lowered_at)}


def _compile_data_parallel(step, mesh, state, consts, idx, key):
    """The curve step as ``mcu.train_curve(..., mesh=mesh)`` compiles it (a
    ``sharding.data_parallel`` program: state, constants and key replicated, the index batch
    split over the devices), from the arguments' shapes alone, traced as on their host
    (:func:`_compile`)."""
    rep = sharding.replicated(mesh)
    with jax.default_device(mesh.devices.flat[0]):
        lowered = sharding.data_parallel(step, mesh).lower(
            _shaped(state, rep), _shaped(consts, rep),
            _shaped(idx, sharding.batch_sharding(mesh, ndim=1)), _shaped(key, rep))
    return lowered.compile()


def _collectives(hlo: str, devices: int) -> str:
    """A data-parallel program's note: its all-gathers and all-reduces, per device."""
    gathers, reduces = (len(re.findall(rf" {op}(?:-start)?\(", hlo))
                        for op in ("all-gather", "all-reduce"))
    return (f"{devices} devices, per device: {gathers} all-gathers, {reduces} all-reduces "
            "(counted as kernels)")


def _conv_calls(kernels: list[tuple[str, int]]) -> str:
    """cuDNN forward convolutions among a program's :func:`hlo_kernels`: fused (bias, side
    input or ReLU in the call) and plain; "no cuDNN" on other backends."""
    labels = [label for label, _ in kernels]
    fused = labels.count("custom-call:__cudnn$convBiasActivationForward")
    plain = labels.count("custom-call:__cudnn$convForward")
    if not fused and not plain:
        return "no cuDNN convolutions (not a GPU)"
    return f"cuDNN convolutions: {fused} fused, {plain} plain"


def _per_image(cost: dict, batch: int) -> dict:
    """A forward pass's cost per image (kernel counts stay per batch)."""
    return {**cost, "flops": cost["flops"] / batch, "bytes": cost["bytes"] / batch,
            "per": f"image ({batch} a batch)"}


@functools.cache
def _workload(model_name: str, dtype: str, n: int) -> tuple:
    """``(model, theta_o, images)``: the model with 10 classes, its variables at key 0 and
    ``n`` of the benchmark's random images (``benchmark.synthetic_images``, seed 0); built
    once per argument set (the sweep-program rows share it)."""
    h, w, c = INPUT_SHAPES.get(model_name, (32, 32, 3))
    model = create(model_name, 10, dtype=dtype)
    theta_o = init_variables(model, jax.random.PRNGKey(0), (1, h, w, c))
    return model, theta_o, synthetic_images(n, (h, w, c), 10, np.random.default_rng(0))


def analyse(model_name: str, batch_size: int, dtype: str, eval_batch: int,
            mask_file: str | None = None, device=None, mesh=None) -> list[dict]:
    """Rows {"program", "flops", "bytes", "kernels", "tiny", "per"} (and "note" for the
    evaluation passes and the comparisons) of the four programs (step, train-mode pass,
    eval-mode pass, eval-mode pass with BatchNorm folded); for a model with ``fused_bn``
    then the step and the train-mode pass with it; for a model with ``pointwise``
    (PreResNet) then the step and both forward passes with its fused 1x1 kernel, and the
    step with the 3x3 kernels too; with ``mask_file`` then the masked step (and the masked
    step with ``fused_bn`` and with the kernels). Compiled for ``device``
    (:func:`target_device`) when given. With a ``mesh`` the step rows are the data-parallel
    step on its devices (batch ``batch_size`` in all; bytes and kernels per device, the
    collectives in the note)."""
    n = max(batch_size, eval_batch)
    model, theta_o, images = _workload(model_name, dtype, n)
    h, w, c = images.x.shape[1:]
    theta_p = init_variables(model, jax.random.PRNGKey(1), (1, h, w, c))
    is_forget = np.arange(n) % 11 == 0
    config = MCUConfig(batch_size=batch_size, progress=False)
    theta_c = curves.midpoint(theta_o["params"], theta_p["params"])
    tx = optax.sgd(config.lr, momentum=config.momentum)
    idx = jnp.arange(batch_size, dtype=jnp.int32)

    def step_row(mask, name: str, model=model) -> dict:
        state, consts, _ = mcu.setup_curve(model, theta_o, theta_p, theta_c, mask, images,
                                           is_forget, (100.0, 90.0), config)
        step = mcu.make_curve_step(model, tx, config, theta_o["params"])
        key = jax.random.PRNGKey(0)
        if mesh is None:
            compiled, extra = _compile(step, state, consts, idx, key, device=device)
        else:
            compiled = _compile_data_parallel(step, mesh, state, consts, idx, key)
            extra = {"collectives": _collectives(compiled.as_text(), mesh.size)}
        return {"program": f"curve step (batch {batch_size}{name})", **_cost(compiled),
                "per": "step", **extra}

    every = jax.tree.map(lambda _: True, theta_o["params"])
    rows = [step_row(every, "")]
    xb = jnp.zeros((batch_size, h, w, c), jnp.float32)

    def train_forward_row(name: str, model=model) -> dict:
        compiled, build = _compile(lambda v, x: model.apply(v, x, train=True,
                                                            mutable=["batch_stats"]),
                                   theta_o, xb, device=device)
        return {"program": f"train-mode forward (batch {batch_size}{name})",
                **_per_image(_cost(compiled), batch_size), **build}

    rows.append(train_forward_row(""))
    xe = jnp.zeros((eval_batch, h, w, c), jnp.float32)

    def eval_forward_row(name: str, m) -> dict:
        compiled, build = _compile(lambda v, x: m.apply(v, x, train=False), theta_o, xe,
                                   device=device)
        kernels = hlo_kernels(compiled.as_text())  # once for the cost and the note
        return {"program": f"eval-mode forward (batch {eval_batch}{name})",
                **_per_image(_cost(compiled, kernels), eval_batch),
                "note": _conv_calls(kernels), **build}

    rows += [eval_forward_row("", model), eval_forward_row(", BN folded", folded(model))]
    # the step variants a mask is applied to as well: (model, unmasked row, label, its name)
    variants = []
    if "fused_bn" in model.__dataclass_fields__:  # the BatchNorm models (evaluation mode
        # is the same program either way)
        fused_model = model.clone(fused_bn=True)
        fused = step_row(every, ", fused BatchNorm", fused_model)
        fused["note"] = _share(fused, rows[0], "the unfused step's")
        forward = train_forward_row(", fused BatchNorm", fused_model)
        forward["note"] = _share(forward, rows[1], "the unfused pass's")
        rows += [fused, forward]
        variants.append((fused_model, fused, "fused BatchNorm", "the unmasked fused step's"))
    if "pointwise" in model.__dataclass_fields__:  # PreResNet: its fused 1x1 kernel (the
        # Pallas kernel when compiled for a GPU, XLA's ops otherwise)
        kernel_model = with_pointwise(model, "fused")
        step = step_row(every, ", fused 1x1 kernel", kernel_model)
        step["note"] = _share(step, rows[0], "the default step's")
        rows.append(step)
        forward = train_forward_row(", fused 1x1 kernel", kernel_model)
        forward["note"] = _share(forward, rows[1], "the default pass's")
        evaluation = eval_forward_row(", fused 1x1 kernel", kernel_model)
        evaluation["note"] += "; " + _share(evaluation, rows[2], "the default pass's")
        rows += [forward, evaluation]
        variants.append((kernel_model, step, "fused 1x1 kernel", "the unmasked kernel step's"))
        # and the 3x3 kernels (forward and backward) in training too
        both = with_conv3x3(kernel_model, "fused")
        step3 = step_row(every, ", fused 1x1 and 3x3 kernels", both)
        step3["note"] = _share(step3, step, "the 1x1 kernel step's")
        rows.append(step3)
        variants.append((both, step3, "fused 1x1 and 3x3 kernels",
                         "the unmasked 1x1 and 3x3 kernel step's"))
    if mask_file is not None:
        mask = masks.load(mask_file, theta_o["params"])
        share = 100.0 * masks.trained_fraction(mask, theta_o["params"])
        name = f", mask from {mask_file}: {share:.1f}% of elements trained"
        row = step_row(mask, name)
        row["note"] = _share(row, rows[0], "the unmasked step's")
        rows.append(row)
        for variant, unmasked, label, unmasked_name in variants:  # the same mask with each
            row = step_row(mask, f"{name}, {label}", variant)
            row["note"] = _share(row, unmasked, unmasked_name)
            rows.append(row)
    return rows


def sweep_row(rows: list[dict], num_t: int, images: int) -> dict:
    """The t-sweep of benchmark.py: per t, a train-mode pass (BatchNorm statistics) and an
    eval-mode pass over ``images`` images each."""
    train_fwd, eval_fwd = rows[1], rows[2]
    count = num_t * images
    return {"program": f"sweep ({num_t} t x ({images:,} BN + {images:,} eval images))",
            "flops": count * (train_fwd["flops"] + eval_fwd["flops"]),
            "bytes": count * (train_fwd["bytes"] + eval_fwd["bytes"]), "per": "sweep"}


SWEEP_FLAGS = ("fold", "pointwise", "conv3x3")


def parse_sweep_program(spec: str) -> tuple[str, int, int, bool, bool, bool]:
    """``"STRATEGY:BN_GROUP:EVAL_BATCH[:fold][:pointwise][:conv3x3]"`` (e.g. ``vmap:1:500``,
    the GPU default; ``map:16:2000:fold`` with BatchNorm folded for evaluation;
    ``map:16:2000:pointwise`` with PreResNet's fused 1x1 kernel in both passes;
    ``...:pointwise:conv3x3`` with its fused 3x3 kernel too; flags in any order) ->
    ``(strategy, bn_group, eval_batch, fold_bn, pointwise, conv3x3)``."""
    parts = spec.split(":")
    flags = parts[3:]
    try:
        strategy, group, eval_batch = parts[0], int(parts[1]), int(parts[2])
        ok = (strategy in ("vmap", "map") and min(group, eval_batch) >= 1
              and len(set(flags)) == len(flags) and set(flags) <= set(SWEEP_FLAGS)
              and ("conv3x3" not in flags or "pointwise" in flags))
    except (IndexError, ValueError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"--sweep-program {spec!r}: expected STRATEGY:BN_GROUP:EVAL_BATCH[:fold]"
            "[:pointwise][:conv3x3] with STRATEGY vmap or map, positive integers and conv3x3 "
            "only with pointwise, e.g. map:16:2000 or map:16:2000:fold")
    return (strategy, group, eval_batch, *(name in flags for name in SWEEP_FLAGS))


def sweep_program_row(model_name: str, dtype: str, batch_size: int, program: tuple,
                      num_t: int, images: int, kernel_s: float, bytes_per_s: float,
                      device=None) -> dict:
    """The sweep's own program (``sweep.chunk_program``, as ``sweep.sweep`` and benchmark.py
    run it: ``num_t`` t, BatchNorm statistics over ``images`` images and accuracy on the
    same) for ``program = (strategy, bn_group, eval_batch, fold_bn, pointwise, conv3x3)``
    (:func:`parse_sweep_program`). Its bytes are the kernels' (:func:`hlo_kernels`, a loop's
    once per iteration) on every backend; the note counts the convolutions that ``vmap`` over
    t made grouped (one group per t) and gives the two-term estimate: the bytes at
    ``bytes_per_s`` plus ``kernel_s`` per kernel."""
    strategy, group, eval_batch, fold, pointwise, conv3x3 = program
    model, theta, data = _workload(model_name, dtype, images)
    if pointwise and "pointwise" not in model.__dataclass_fields__:
        raise SystemExit(f"--sweep-program ...:pointwise: model {model_name} has no pointwise "
                         "field (PreResNet only)")
    every = np.arange(images)
    fn, args, statics = sweep.chunk_program(
        model, [theta["params"]] * 3, np.linspace(0.0, 1.0, num_t), theta["batch_stats"],
        (data, every), {"eval": (data, every)}, bn_batch_size=batch_size,
        eval_batch_size=eval_batch, strategy=strategy, bn_group=group, fold_bn=fold,
        pointwise="fused" if pointwise else "conv", conv3x3="fused" if conv3x3 else "conv")
    compiled, build = _compile(functools.partial(fn, **statics), *args, device=device)
    hlo = compiled.as_text()
    kernels = hlo_kernels(hlo)
    nbytes = float(sum(b for _, b in kernels))
    grouped = sum(int(g) > 1 for g in re.findall(r"feature_group_count=(\d+)", hlo))
    convs = len(re.findall(r"convolution\(|__cudnn\$conv", hlo))
    estimate = nbytes / bytes_per_s + len(kernels) * kernel_s
    batches = bn.describe_pass(images, batch_size, group)
    return {"program": f"sweep program: {strategy} over t, BN {batches}, eval batch {eval_batch}"
                       f"{', BN folded' if fold else ''}"
                       f"{', fused 1x1 kernel' if pointwise else ''}"
                       f"{', fused 3x3 kernel' if conv3x3 else ''}"
                       f" ({num_t} t x ({images:,} BN + {images:,} eval images))",
            "flops": math.nan, "bytes": nbytes, "kernels": len(kernels),
            "tiny": sum(b < TINY_BYTES for _, b in kernels), "per": "sweep",
            "note": f"{grouped} of {convs} convolutions in the program grouped; bytes + "
                    f"{1e6 * kernel_s:.3g} us a kernel: {estimate:.3g} s", **build}


def _time(seconds: float) -> str:
    return f"{1e3 * seconds:.3g} ms" if seconds >= 1e-3 else f"{1e6 * seconds:.3g} us"


def table(rows: list[dict], flops_per_s: float, bytes_per_s: float) -> str:
    lines = ["| program | per | FLOPs | bytes accessed | arithmetic time | memory time | "
             "kernels (under 1 MB) | note | build: trace + lower, compile (this host) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = ("-", "-") if math.isnan(r["flops"]) else (
            f"{r['flops']:.3g}", _time(r["flops"] / flops_per_s))
        kernels = f"{r['kernels']} ({r['tiny']})" if "kernels" in r else "-"
        note = "; ".join(r[k] for k in ("collectives", "note") if r.get(k))
        build = "-" if "build" not in r else f"{r['build'][0]:.1f} s, {r['build'][1]:.1f} s"
        lines.append(
            f"| {r['program']} | {r['per']} | {flops[0]} | {r['bytes']:.3g} | {flops[1]} | "
            f"{_time(r['bytes'] / bytes_per_s)} | {kernels} | {note} | {build} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preresnet110")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--num-t", type=int, default=20, help="t of the sweep row")
    p.add_argument("--sweep-images", type=int, default=6000, help="images per pass and t")
    p.add_argument("--flops-per-s", type=float, default=4e14)
    p.add_argument("--bytes-per-s", type=float, default=3e12)
    p.add_argument("--mask", metavar="FILE", default=None,
                   help="also the step with this saved mask (masks.save / mcu-jax mask)")
    p.add_argument("--sweep-program",
                   metavar="STRATEGY:BN_GROUP:EVAL_BATCH[:fold][:pointwise][:conv3x3]",
                   action="append",
                   type=parse_sweep_program, default=[],
                   help="also the sweep's own program with these settings, for --num-t t "
                   "over --sweep-images images (repeatable; vmap:1:500 is the GPU default)")
    p.add_argument("--kernel-us", type=float, default=3.5,
                   help="microseconds a kernel, for the sweep programs' two-term estimate")
    p.add_argument("--devices", type=int, default=1,
                   help="the step rows as the data-parallel step on this many devices (GPUs "
                   "of --gpu-target, else the CPU's: XLA_FLAGS="
                   "--xla_force_host_platform_device_count=N)")
    p.add_argument("--gpu-target", metavar="FILE", default=None,
                   help="compile for the GPU this XLA target config describes, without one "
                   "(experiments/gpu_targets/h100.pbtxt; needs JAX's CUDA plugin)")
    args = p.parse_args(argv)
    for name in ("batch_size", "eval_batch", "num_t", "sweep_images", "flops_per_s",
                 "bytes_per_s", "kernel_us", "devices"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    device = target_device(args.gpu_target) if args.gpu_target else None
    mesh = None
    if args.devices > 1:
        gpus = target_device(args.gpu_target, args.devices) if args.gpu_target else None
        try:
            mesh = sharding.make_mesh(args.devices, devices=gpus)
            sharding.check_batch_size(args.batch_size, mesh, "--batch-size")
        except ValueError as err:
            p.error(str(err))
    rows = analyse(args.model, args.batch_size, args.dtype, args.eval_batch, args.mask, device,
                   mesh)
    rows.insert(4, sweep_row(rows, args.num_t, args.sweep_images))  # after the 4 programs
    rows += [sweep_program_row(args.model, args.dtype, args.batch_size, program, args.num_t,
                               args.sweep_images, 1e-6 * args.kernel_us, args.bytes_per_s,
                               device) for program in args.sweep_program]
    where = (f"{device.device_kind}, compiled without it from {args.gpu_target}" if device
             else jax.devices()[0].device_kind)
    text = (f"# XLA cost analysis: {args.model} {args.dtype} on {where} "
            f"(jax {jax.__version__})\n\n"
            + table(rows, args.flops_per_s, args.bytes_per_s))
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
