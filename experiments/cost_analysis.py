"""XLA's own estimate of the arithmetic and memory traffic of mcu-jax's programs (operand and
output bytes of each fusion of the compiled program, on the backend it is compiled for).

usage: python experiments/cost_analysis.py [--model preresnet110] [--batch-size 128]
                                           [--dtype float32] [--eval-batch 500] [--num-t 20]
                                           [--sweep-images 6000] [--flops-per-s 4e14]
                                           [--bytes-per-s 3e12] [--mask MASK.json]

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
compiles the step with the models' ``fused_bn`` (BatchNorm + ReLU with a hand-written
backward pass, ``models/batchnorm.py``). With ``--mask`` (a mask saved by
``masks.save``, e.g. ``mcu-jax mask`` or an MCU run's ``mask.json``) it also compiles the
step with that mask, whose frozen tensors get no weight gradient (with and without
``fused_bn``). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcu_jax import curves, masks, mcu
from mcu_jax.data import Images
from mcu_jax.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from mcu_jax.mcu import MCUConfig
from mcu_jax.models import create, folded, init_variables

SHAPES = {"cnn_small": (8, 8, 1), "vgg16_bn": (64, 64, 3), "vit_b16": (224, 224, 3)}


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _share(row: dict, plain: dict, plain_name: str) -> str:
    """``row``'s FLOPs and bytes as shares of ``plain``'s (the same program without the
    row's change, called ``plain_name``)."""
    return (f"{row['flops'] / plain['flops']:.2f} of {plain_name} FLOPs, "
            f"{row['bytes'] / plain['bytes']:.2f} of its bytes")


def _conv_calls(compiled) -> str:
    """cuDNN forward convolutions of a compiled program: fused (bias, side input or ReLU in
    the call) and plain; "no cuDNN" on other backends."""
    text = compiled.as_text()
    fused = text.count('custom_call_target="__cudnn$convBiasActivationForward"')
    plain = text.count('custom_call_target="__cudnn$convForward"')
    if not fused and not plain:
        return "no cuDNN convolutions (not a GPU)"
    return f"cuDNN convolutions: {fused} fused, {plain} plain"


def analyse(model_name: str, batch_size: int, dtype: str, eval_batch: int,
            mask_file: str | None = None) -> list[dict]:
    """Rows {"program", "flops", "bytes", "per"} (and "note" for the evaluation passes) of
    the four programs, then the masked step's when ``mask_file`` is given."""
    h, w, c = SHAPES.get(model_name, (32, 32, 3))
    model = create(model_name, 10, dtype=dtype)
    theta_o = init_variables(model, jax.random.PRNGKey(0), (1, h, w, c))
    theta_p = init_variables(model, jax.random.PRNGKey(1), (1, h, w, c))
    n = max(batch_size, eval_batch)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    images = Images.from_arrays(x, y, (CIFAR10_MEAN * c)[:c], (CIFAR10_STD * c)[:c],
                                "crop_flip" if (h, w) == (32, 32) else "none")
    is_forget = np.arange(n) % 11 == 0
    config = MCUConfig(batch_size=batch_size, progress=False)
    theta_c = curves.midpoint(theta_o["params"], theta_p["params"])
    tx = optax.sgd(config.lr, momentum=config.momentum)
    idx = jnp.arange(batch_size, dtype=jnp.int32)

    def step_row(mask, name: str, model=model) -> dict:
        state, consts, _ = mcu.setup_curve(model, theta_o, theta_p, theta_c, mask, images,
                                           is_forget, (100.0, 90.0), config)
        step = mcu.make_curve_step(model, tx, config, theta_o["params"])
        flops, nbytes = _cost(jax.jit(step).lower(state, consts, idx, jax.random.PRNGKey(0))
                              .compile())
        return {"program": f"curve step (batch {batch_size}{name})", "flops": flops,
                "bytes": nbytes, "per": "step"}

    every = jax.tree.map(lambda _: True, theta_o["params"])
    rows = [step_row(every, "")]
    xb = jnp.zeros((batch_size, h, w, c), jnp.float32)
    train_fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    flops, nbytes = _cost(train_fwd.lower(theta_o, xb).compile())
    rows.append({"program": f"train-mode forward (batch {batch_size})",
                 "flops": flops / batch_size, "bytes": nbytes / batch_size, "per": "image"})
    xe = jnp.zeros((eval_batch, h, w, c), jnp.float32)
    for name, m in (("", model), (", BN folded", folded(model))):
        eval_fwd = jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))
        compiled = eval_fwd.lower(theta_o, xe).compile()
        flops, nbytes = _cost(compiled)
        rows.append({"program": f"eval-mode forward (batch {eval_batch}{name})",
                     "flops": flops / eval_batch, "bytes": nbytes / eval_batch,
                     "per": "image", "note": _conv_calls(compiled)})
    fused = fused_model = None
    if "fused_bn" in model.__dataclass_fields__:  # the BatchNorm models (the forward
        # passes are the same program either way)
        fused_model = model.clone(fused_bn=True)
        fused = step_row(every, ", fused BatchNorm", fused_model)
        fused["note"] = _share(fused, rows[0], "the unfused step's")
        rows.append(fused)
    if mask_file is not None:
        mask = masks.load(mask_file, theta_o["params"])
        share = 100.0 * masks.trained_fraction(mask, theta_o["params"])
        name = f", mask from {mask_file}: {share:.1f}% of elements trained"
        row = step_row(mask, name)
        row["note"] = _share(row, rows[0], "the unmasked step's")
        rows.append(row)
        if fused is not None:  # the same mask with the fused BatchNorm
            row = step_row(mask, name + ", fused BatchNorm", fused_model)
            row["note"] = _share(row, fused, "the unmasked fused step's")
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


def _time(seconds: float) -> str:
    return f"{1e3 * seconds:.3g} ms" if seconds >= 1e-3 else f"{1e6 * seconds:.3g} us"


def table(rows: list[dict], flops_per_s: float, bytes_per_s: float) -> str:
    lines = ["| program | per | FLOPs | bytes accessed | arithmetic time | memory time | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['program']} | {r['per']} | {r['flops']:.3g} | {r['bytes']:.3g} | "
            f"{_time(r['flops'] / flops_per_s)} | {_time(r['bytes'] / bytes_per_s)} | "
            f"{r.get('note', '')} |"
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
    args = p.parse_args(argv)
    for name in ("batch_size", "eval_batch", "num_t", "sweep_images", "flops_per_s",
                 "bytes_per_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    rows = analyse(args.model, args.batch_size, args.dtype, args.eval_batch, args.mask)
    rows.insert(4, sweep_row(rows, args.num_t, args.sweep_images))  # after the 4 programs
    text = (f"# XLA cost analysis: {args.model} {args.dtype} on {jax.devices()[0].device_kind} "
            f"(jax {jax.__version__})\n\n"
            + table(rows, args.flops_per_s, args.bytes_per_s))
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
