"""Checks the fused 1x1 kernel (mcu_jax/models/pointwise.py) where it runs: its Pallas kernel on
a GPU (interpreted elsewhere) against the same computation in XLA ops, on the shapes of
PreResNet-110's 1x1 convolutions, and a PreResNet with it against the default model. The
default sizes fill no whole number of the kernel's blocks of rows (4,100 rows; 63 images),
so its padded last block is checked too.

usage: python experiments/check_pointwise.py [--rows 4100] [--batch 63] [--depth 20]
                                            [--dtype float32]

Prints one line per check with the largest difference relative to the largest value, and
exits with status 1 if any is above the tolerance (float32: 2e-2, as both sides may multiply
in TF32 on a GPU; bfloat16: 5e-2). ``experiments/gpu_check.sh`` runs it as the part
``pointwise_check`` before timing the kernel: the tests run it interpreted only.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import models
from mcu_jax.models import pointwise as pw

#: (K, N) of PreResNet-110's 1x1 convolutions: conv1 (4 planes -> planes; the first block
#: of a stage reads the previous stage's width) and conv3 (planes -> 4 planes), planes 16, 32,
#: 64.
SHAPES = ((16, 16), (64, 16), (16, 64), (64, 32), (128, 32), (32, 128), (128, 64), (256, 64),
          (64, 256))


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def kernel_checks(rows: int, dtype, impl: str) -> list[tuple[str, float]]:
    """``(label, relative difference)`` of the kernel's output and channel sums against the
    "xla" impl, for every shape in :data:`SHAPES`, with a residual and with an output bias
    and ReLU (a BatchNorm folded in)."""
    rng = np.random.default_rng(0)
    results = []
    for k, n in SHAPES:
        z = jnp.asarray(rng.normal(size=(rows, k)), dtype)
        mean, bias = (jnp.asarray(rng.normal(size=k), jnp.float32) for _ in range(2))
        mul = jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
        residual = jnp.asarray(rng.normal(size=(rows, n)), dtype)
        out_bias = jnp.asarray(rng.normal(size=n), jnp.float32)
        for label, options in (("residual", {"residual": residual}),
                               ("output bias and ReLU", {"out_bias": out_bias,
                                                         "out_relu": True})):
            got, (g1, g2) = jax.jit(lambda *a, o=options: pw.bn_relu_matmul(
                *a, **o, stats=True, impl=impl))(z, mean, mul, bias, w)
            want, (w1, w2) = pw.bn_relu_matmul(z, mean, mul, bias, w, **options, stats=True,
                                               impl="xla")
            worst = max(_relative(got, want), _relative(g1, w1), _relative(g2, w2))
            results.append((f"kernel K={k} N={n}, {rows} rows, {label}", worst))
    return results


def model_check(batch: int, depth: int, dtype, pointwise: str) -> tuple[str, float]:
    """A PreResNet's train-mode logits and batch statistics and its eval-mode logits (also
    with BatchNorm folded) on ``batch`` random images, with ``pointwise`` against the default
    model."""
    base = models.create("preresnet110", 10, depth=depth, dtype=dtype)
    v = models.init_variables(base, jax.random.PRNGKey(0), (1, 32, 32, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))

    @jax.jit
    def run(variables):
        kernel = models.with_pointwise(base, pointwise)
        return [(m.apply(variables, x, train=True, mutable=["batch_stats"]),
                 m.apply(variables, x, train=False), f.apply(variables, x, train=False))
                for m, f in ((kernel, models.folded(kernel)), (base, base))]

    got, want = run(v)
    worst = max(_relative(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                                                strict=True))
    return f"PreResNet-{depth} pointwise={pointwise!r} against the default model", worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4100, help="rows (images x positions) a check")
    p.add_argument("--batch", type=int, default=63, help="images of the model check")
    p.add_argument("--depth", type=int, default=20, help="the model check's PreResNet (9n+2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    for name in ("rows", "batch", "depth"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    gpu = jax.default_backend() == "gpu"
    impl, setting = ("pallas", "fused") if gpu else ("interpret", "interpret")
    dtype = jnp.dtype(args.dtype)
    tolerance = 2e-2 if args.dtype == "float32" else 5e-2
    checks = [*kernel_checks(args.rows, dtype, impl),
              model_check(args.batch, args.depth, dtype, setting)]
    print(f"# fused 1x1 kernel ({impl}, {args.dtype}) on {jax.devices()[0].device_kind}")
    failed = 0
    for label, worst in checks:
        ok = worst <= tolerance
        failed += not ok
        print(f"- {label}: largest difference {worst:.2e} of the largest value "
              f"({'within' if ok else 'ABOVE'} the tolerance {tolerance:g})")
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
