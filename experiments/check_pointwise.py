"""Checks the fused 1x1 kernel (mcu_jax/models/pointwise.py) where it runs: its Pallas kernels
(forward and backward) on a GPU (interpreted elsewhere) against the same computation in XLA
ops, on the shapes of PreResNet-110's 1x1 convolutions, and a PreResNet with it against the
default model (outputs and gradients). The default sizes fill no whole number of the
kernel's blocks of rows (4,100 rows; 63 images), so its padded last block is checked too.
With them, the fused 3x3 kernel (mcu_jax/models/conv3x3.py) and its backward kernel on
PreResNet-110's stride-1 3x3 shapes, and the model with them too (outputs and gradients).
Also the curve point's kernel (mcu_jax/combine.py) on PreResNet-110's weight tensors, and
the kernels of a BatchNorm given as its input's sums (mcu_jax/models/bn_input.py: its
coefficients from a kernel's shares, its derivative from a backward kernel's) on the sizes
PreResNet-110's blocks give them, and the kernel that chains a block's conv3 and the next
block's conv1 in folded evaluation (mcu_jax/models/chain.py) on PreResNet-110's pairs.

usage: python experiments/check_pointwise.py [--rows 4100] [--batch 63] [--depth 20]
                                            [--dtype float32]
                                            [--checks all|pointwise|curve-point]

The kernel checks run in float32 and bfloat16, the model check in ``--dtype``.

Prints one line per check with its relative difference (the largest difference over the
largest value; for the model's gradient, the norm of the difference over the gradient's
norm), and exits with status 1 if any is above the tolerance (float32: 2e-2, as both
sides may multiply in TF32 on a GPU; bfloat16: 5e-2; the curve point: 1e-6 and 2^-7).
``experiments/gpu_check.sh`` runs ``--checks curve-point`` before its first part when a part
trains a curve (every curve step on a GPU runs that kernel) and ``--checks pointwise`` as the
part ``pointwise_check`` before timing the 1x1 kernel: the tests run it interpreted only.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import combine, curves, mcu, models, packing, pytrees
from mcu_jax import train as train_lib
from mcu_jax.models import bn_input, chain
from mcu_jax.models import conv3x3 as c3
from mcu_jax.models import pointwise as pw

#: (K, N) of PreResNet-110's 1x1 convolutions, planes 16, 32, 64: conv1 (4 planes ->
#: planes; the first block of a stage reads the previous stage's width), which training runs
#: with the next BatchNorm + ReLU after it (``pointwise.bn_relu_matmul_bn``), and conv3
#: (planes -> 4 planes).
CONV1 = ((16, 16), (64, 16), (64, 32), (128, 32), (128, 64), (256, 64))
CONV3 = ((16, 64), (32, 128), (64, 256))
SHAPES = CONV1 + CONV3
#: (image side, channels) of PreResNet-110's stride-1 3x3 convolutions (K = N = planes).
CONV2 = ((32, 16), (16, 32), (8, 64))
#: (K, N, N2) of the chain kernel (mcu_jax/models/chain.py) in PreResNet-110's folded
#: evaluation: a block's conv3 (planes -> 4 planes) and the next block's conv1 (-> its planes,
#: the next stage's at a stage's end).
CHAIN = ((16, 64, 16), (16, 64, 32), (32, 128, 32), (32, 128, 64), (64, 256, 64))


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _worst(a, b) -> float:
    """The largest :func:`_relative` difference over two pytrees' leaves."""
    return max(_relative(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                               strict=True))


def _derivative(impl: str, cotangents, *args):
    """The cotangents of ``bn_relu_matmul(*args, stats=True, return_input=True,
    impl=impl)``'s operands (z's with the returned input's cotangent added): every operand
    the backward kernel takes in training (conv1's returned input, conv3's differentiated
    residual) in one kernel; :func:`model_checks` runs the two as training compiles them."""
    return jax.vjp(functools.partial(pw.bn_relu_matmul, stats=True, return_input=True,
                                     impl=impl), *args)[1](cotangents)


def _operands(rng, rows: int, k: int, n: int, dtype) -> tuple:
    """Random ``(z, mean, mul, bias, w, residual)`` of the kernel."""
    z = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    mean, bias = (jnp.asarray(rng.normal(size=k), jnp.float32) for _ in range(2))
    mul = jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
    return z, mean, mul, bias, w, jnp.asarray(rng.normal(size=(rows, n)), dtype)


def _backward_check(rng, args, impl: str) -> float:
    """The kernel's VJP (the backward kernel) against autodiff of the XLA ops, with random
    cotangents for the output, both sums and the returned input: the largest relative
    difference."""
    rows, n = args[-1].shape
    cotangents = (jnp.asarray(rng.normal(size=(rows, n)), args[0].dtype),
                  tuple(jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(2)),
                  jnp.asarray(rng.normal(size=args[0].shape), args[0].dtype))
    derivative = jax.jit(_derivative, static_argnums=0)
    got, want = (derivative(i, cotangents, *args) for i in (impl, "xla"))
    return max(_relative(a, b) for a, b in zip(got, want, strict=True))


def _following_check(rng, args, impl: str) -> float:
    """``bn_relu_matmul_bn``'s derivative (the backward kernel taking the next BatchNorm +
    ReLU's output cotangent) against autodiff of the XLA ops, with random cotangents for
    its output, statistics and returned input: the largest relative difference."""
    z, mean, mul, bias, w, _ = args
    n = w.shape[1]
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32)
    offset = jnp.asarray(0.3 * rng.normal(size=n), jnp.float32)
    cotangents = (jnp.asarray(rng.normal(size=(len(z), n)), z.dtype),
                  tuple(jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(2)),
                  jnp.asarray(rng.normal(size=z.shape), z.dtype))

    @functools.partial(jax.jit, static_argnums=0)
    def derivative(i, *operands):
        return jax.vjp(functools.partial(pw.bn_relu_matmul_bn, epsilon=1e-5,
                                         return_input=True, impl=i), *operands)[1](cotangents)

    got, want = (derivative(i, z, mean, mul, bias, w, scale, offset) for i in (impl, "xla"))
    return max(_relative(a, b) for a, b in zip(got, want, strict=True))


def kernel_checks(rows: int, dtype, impl: str) -> list[tuple[str, float]]:
    """``(label, relative difference)`` of the kernel's output and channel sums against the
    "xla" impl, for every shape in :data:`SHAPES`, with a residual and with an output bias
    and ReLU (a BatchNorm folded in), and of its derivative (the backward kernel) against
    autodiff of the "xla" impl, for conv1's shapes with K = 4N also with the next
    BatchNorm + ReLU after it (``bn_relu_matmul_bn``); then the derivative once more on 32
    x ``rows`` rows (131,200 by default, about a training step's first stage), where each
    program of the backward kernel loops over many blocks of rows."""
    rng = np.random.default_rng(0)
    name = jnp.dtype(dtype).name
    results = []
    for k, n in SHAPES:
        z, mean, mul, bias, w, residual = args = _operands(rng, rows, k, n, dtype)
        out_bias = jnp.asarray(rng.normal(size=n), jnp.float32)
        for label, options in (("residual", {"residual": residual}),
                               ("output bias and ReLU", {"out_bias": out_bias,
                                                         "out_relu": True})):
            got, (g1, g2) = jax.jit(lambda *a, o=options: pw.bn_relu_matmul(
                *a, **o, stats=True, impl=impl))(z, mean, mul, bias, w)
            want, (w1, w2) = pw.bn_relu_matmul(z, mean, mul, bias, w, **options, stats=True,
                                               impl="xla")
            worst = max(_relative(got, want), _relative(g1, w1), _relative(g2, w2))
            results.append((f"kernel K={k} N={n}, {rows} rows, {name}, {label}", worst))
        results.append((f"backward kernel K={k} N={n}, {rows} rows, {name}, residual",
                        _backward_check(rng, args, impl)))
        if (k, n) in CONV1 and k == 4 * n:  # conv1 of a stage's later blocks: 33 of 36
            results.append((f"backward kernel K={k} N={n}, {rows} rows, {name}, the next "
                            "BatchNorm + ReLU", _following_check(rng, args, impl)))
    k, n = SHAPES[1]
    results.append((f"backward kernel K={k} N={n}, {32 * rows} rows, {name}, residual",
                    _backward_check(rng, _operands(rng, 32 * rows, k, n, dtype), impl)))
    return results


def chain_checks(rows: int, dtype, impl: str) -> list[tuple[str, float]]:
    """``(label, relative difference)`` of the chain kernel's two outputs against the "xla"
    impl (the two 1x1 kernels' computation), for every pair in :data:`CHAIN`."""
    rng = np.random.default_rng(1)
    name = jnp.dtype(dtype).name
    results = []
    for k, n, n_next in CHAIN:
        a = jnp.asarray(np.maximum(rng.normal(size=(rows, k)), 0), dtype)
        mean, bias = (jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(2))
        mul = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
        args = (a, jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32),
                jnp.asarray(rng.normal(size=(rows, n)), dtype), mean, mul, bias,
                jnp.asarray(rng.normal(size=(n, n_next)) / np.sqrt(n), jnp.float32),
                jnp.asarray(rng.normal(size=n_next), jnp.float32))
        got = jax.jit(functools.partial(chain.matmul_chain, impl=impl))(*args)
        want = chain.matmul_chain(*args, impl="xla")
        results.append((f"chain kernel K={k} N={n} N2={n_next}, {rows} rows, {name}",
                        max(_relative(g, w) for g, w in zip(got, want, strict=True))))
    return results


def conv3x3_checks(batch: int, dtype, impl: str) -> list[tuple[str, float]]:
    """``(label, relative difference)`` of the 3x3 kernel's output and channel sums, and of
    the backward kernel's cotangents of every operand (for a loss of the output and both
    sums), against the "xla" impl (autodiff of XLA's ops) on ``batch`` images of each shape
    in :data:`CONV2`, whose images fill whole blocks of pixels, and on 5 images of 7 x 7
    pixels with K=16, N=32: programs that span two images and a last block part empty."""
    rng = np.random.default_rng(2)
    results = []
    for b, side, k, n in [(batch, side, c, c) for side, c in CONV2] + [(5, 7, 16, 32)]:
        z = jnp.asarray(rng.normal(size=(b, side, side, k)), dtype)
        mean, bias = (jnp.asarray(rng.normal(size=k), jnp.float32) for _ in range(2))
        mul = jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, k, n)) / np.sqrt(9 * k), jnp.float32)
        cotangents = (jnp.asarray(rng.normal(size=(b, side, side, n)), jnp.float32),
                      *jnp.asarray(rng.normal(size=(2, n)) / (b * side * side), jnp.float32))

        def run(impl, *operands, c=cotangents):
            out, pullback = jax.vjp(functools.partial(c3.bn_relu_conv3x3, stats=True,
                                                      impl=impl), *operands)
            return out, pullback((c[0].astype(out[0].dtype), (c[1], c[2])))

        label = f"3x3 kernel K={k} N={n}, {b} x {side} x {side}, {jnp.dtype(dtype).name}"
        got, want = (jax.jit(functools.partial(run, i))(z, mean, mul, bias, w)
                     for i in (impl, "xla"))
        results += [(label, _worst(got[0], want[0])),
                    (f"{label}: backward kernel", _worst(got[1], want[1]))]
    return results


#: ``(P, K, weight gradient's shape)`` of ``bn_input``'s kernels at batch 128: conv3's and
#: conv1's backward shares in stages 1 and 3, the 3x3 kernel's in stage 1, and Ps that are
#: not powers of two (252: the model check's 63 images).
BN_INPUT = ((256, 16, (16, 64)), (32, 64, (64, 256)), (256, 64, (64, 16)),
            (256, 16, (3, 3, 16, 16)), (6, 32, (32, 128)), (252, 16, (16, 64)))
#: ``(P, K)`` of ``bn_input.coefficients_of``'s checks: forward shares, up to 1,024 (the 1x1
#: kernel's programs over stage 1's 131,072 rows; 504 over the model check's 63 images).
BN_COEFFICIENTS = ((1024, 64), (256, 16), (6, 32), (504, 64))


def bn_input_checks(impl: str) -> list[tuple[str, float]]:
    """``(label, relative difference)`` of ``bn_input.finish`` (the sums' cotangents, the
    scale's and bias's gradients and the weight gradient from a backward kernel's shares)
    and ``bn_input.coefficients_of`` (a BatchNorm's coefficients from a forward kernel's
    shares) against their "xla" impl, on the sizes of :data:`BN_INPUT` and
    :data:`BN_COEFFICIENTS`."""
    rng = np.random.default_rng(3)
    results = []
    for p, k, shape in BN_INPUT:
        sums = jnp.asarray(rng.normal(size=(p, 2, k)), jnp.float32)
        d_w = jnp.asarray(rng.normal(size=(p, *shape)), jnp.float32)
        mean, raw = (jnp.asarray(rng.normal(size=k), jnp.float32) for _ in range(2))
        mul = jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)
        got, want = (jax.jit(functools.partial(bn_input.finish, n=100_000, epsilon=1e-5,
                                               impl=i))(sums, d_w, mean, raw, mul)
                     for i in (impl, "xla"))
        results.append((f"BatchNorm derivative from {p} shares of K={k}, weight gradient "
                        f"{shape}", _worst(got, want)))
    for p, k in BN_COEFFICIENTS:
        shares = np.abs(rng.normal(size=(p, 2, k))).astype(np.float32)
        scale, bias = (jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)
                       for _ in range(2))
        got, want = (jax.jit(functools.partial(bn_input.coefficients_of, n=100_000,
                                               epsilon=1e-5, impl=i))(shares, scale, bias)
                     for i in (impl, "xla"))
        results.append((f"BatchNorm coefficients from {p} shares of K={k}", _worst(got, want)))
    return results


def _global(a, b) -> float:
    """The norm of the difference of two pytrees over the norm of ``b``: gradients of a deep
    model at initialisation have leaves near zero, where any rounding is large relative to
    the leaf."""
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
            for t in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def model_checks(batch: int, depth: int, dtype, pointwise: str) -> list[tuple[str, float]]:
    """A PreResNet's train-mode logits and batch statistics and its eval-mode logits (also
    with BatchNorm folded), and the gradient of its training loss (cross-entropy, random
    labels; relative in norm), on ``batch`` random images, with ``pointwise`` against the
    default model."""
    base = models.create("preresnet110", 10, depth=depth, dtype=dtype)
    v = models.init_variables(base, jax.random.PRNGKey(0), (1, 32, 32, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
    labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)

    def train(m, params):
        return m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])

    def loss(m, params):  # the training objective (mean cross-entropy)
        return train_lib.cross_entropy_loss(train(m, params)[0], labels, None, None)[0]

    def forward(m, variables, fold=True):  # train mode, evaluation (and folded)
        out = (train(m, variables["params"]), m.apply(variables, x, train=False))
        return (*out, models.folded(m).apply(variables, x, train=False)) if fold else out

    @jax.jit
    def run(variables):
        kernel = models.with_pointwise(base, pointwise)
        # the 3x3 kernels: train mode, its gradient and evaluation (folded, conv2 stays
        # cuDNN's)
        both = models.with_conv3x3(kernel, pointwise)
        return ([(forward(m, variables), jax.grad(functools.partial(loss, m))(
            variables["params"])) for m in (kernel, base)],
            (forward(both, variables, fold=False),
             jax.grad(functools.partial(loss, both))(variables["params"])))

    ((got, got_grad), (want, want_grad)), (got3, got3_grad) = run(v)
    name = f"PreResNet-{depth} pointwise={pointwise!r} against the default model"
    name3 = name.replace(" against", f", conv3x3={pointwise!r} against")

    return [(f"{name}: logits and batch statistics", _worst(got, want)),
            (f"{name}: gradient of the loss (in norm)", _global(got_grad, want_grad)),
            (f"{name3}: logits and batch statistics", _worst(got3, want[:2])),
            (f"{name3}: gradient of the loss (in norm)", _global(got3_grad, want_grad))]


#: The model whose weight tensors :func:`curve_point_checks` forms (a registered name).
CURVE_MODEL = "preresnet110"


def curve_point_checks(impl: str) -> list[tuple[str, float, float]]:
    """``(label, relative difference, tolerance)`` of the curve point's weight tensors
    (``combine.weighted_sum``) of :data:`CURVE_MODEL` (PreResNet-110), from three random
    points at t = 0.3, in float32 and as bfloat16 kernels, against the "xla" impl (the worst
    tensor): the same sums, up to a fused multiply-add's rounding and then bfloat16's."""
    shapes = pytrees.flatten(models.variable_shapes(models.create(CURVE_MODEL, 10),
                                                    (1, 32, 32, 3))["params"])
    layout = mcu.layouts(shapes)["tensors"]
    rng = np.random.default_rng(1)
    points = [packing.pack(layout, {k: jnp.asarray(rng.normal(size=s), jnp.float32)
                                    for k, s in zip(layout.paths, layout.shapes,
                                                    strict=True)})
              for _ in range(3)]
    weights = curves.weights("bezier", jnp.float32(0.3))
    results = []
    for dtype in (jnp.float32, jnp.bfloat16):
        dtypes = {k: dtype for k in layout.paths}
        got, want = (jax.jit(lambda *p, i=i, d=dtypes: combine.weighted_sum(
            layout, p, weights, d, impl=i))(*points) for i in (impl, "xla"))
        results.append((f"curve point's {len(layout.paths)} weight tensors, "
                        f"{jnp.dtype(dtype).name}",
                        max(_relative(got[k], want[k]) for k in layout.paths),
                        1e-6 if dtype == jnp.float32 else 2.0 ** -7))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4100, help="rows (images x positions) a check")
    p.add_argument("--batch", type=int, default=63, help="images of the model check")
    p.add_argument("--depth", type=int, default=20, help="the model check's PreResNet (9n+2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the model check's dtype (the kernel checks run in both)")
    p.add_argument("--checks", default="all", choices=("all", "pointwise", "curve-point"),
                   help="pointwise: the fused 1x1 and 3x3 kernels' checks only; curve-point: "
                   "the curve point's kernel's only (every curve step on a GPU runs it: "
                   "gpu_check.sh checks it first)")
    args = p.parse_args(argv)
    for name in ("rows", "batch", "depth"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    gpu = jax.default_backend() == "gpu"
    impl, setting = ("pallas", "fused") if gpu else ("interpret", "interpret")
    tolerance = {"float32": 2e-2, "bfloat16": 5e-2}
    checks, checked = [], []
    if args.checks != "curve-point":
        checks += [(label, worst, tolerance[name]) for name in tolerance
                   for label, worst in (kernel_checks(args.rows, jnp.dtype(name), impl)
                                        + conv3x3_checks(args.batch, jnp.dtype(name), impl)
                                        + chain_checks(args.rows, jnp.dtype(name), impl))]
        checks += [(label, worst, tolerance["float32"])
                   for label, worst in bn_input_checks(impl)]
        checks += [(label, worst, tolerance[args.dtype]) for label, worst in
                   model_checks(args.batch, args.depth, jnp.dtype(args.dtype), setting)]
        checked.append(f"fused 1x1 and 3x3 kernels ({impl}; the model in {args.dtype})")
    if args.checks != "pointwise":
        checks += curve_point_checks(impl)
        checked.append(f"curve point kernel ({impl})")
    print(f"# {' and '.join(checked)} on {jax.devices()[0].device_kind}")
    failed = 0
    for label, worst, tol in checks:
        ok = worst <= tol
        failed += not ok
        print(f"- {label}: relative difference {worst:.2e} "
              f"({'within' if ok else 'ABOVE'} the tolerance {tol:g})")
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
