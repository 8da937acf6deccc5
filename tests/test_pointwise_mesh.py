"""The fused 1x1 kernels (models/pointwise.py) in data-parallel programs: each device runs
them on its own rows, and the results equal one device's; curve training there with the
curve point's kernel (combine.py) too; the 3x3 kernel (models/conv3x3.py); and the chain
kernel of folded evaluation (models/chain.py).

XLA fixes the number of host devices when jax is first imported, so the comparisons run in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``: this file, run as a
script, prints a JSON summary that the test below checks. The kernels are interpreted by
Pallas (``impl="interpret"``), which runs the same kernel code on the CPU.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from test_sharding import _max_diff  # largest difference and allclose (rtol 1e-4)

DEVICES = 4


def _kernel_part(mesh) -> dict:
    """The kernel alone: a loss of its output and statistics and the loss's gradient, as a
    data-parallel program on rows split over the mesh, against XLA's ops on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mcu_jax import sharding
    from mcu_jax.models import pointwise as pw

    rng = np.random.default_rng(0)
    m, k, n = 4 * DEVICES * 40, 32, 64  # 160 rows a device: not a whole number of blocks
    z = rng.normal(size=(m, k)).astype(np.float32)
    mean, bias = rng.normal(size=(2, k)).astype(np.float32)
    mul = rng.uniform(0.5, 2.0, size=k).astype(np.float32)
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    residual = rng.normal(size=(m, n)).astype(np.float32)

    def loss(impl, z, mean, mul, bias, w, residual):
        out, (s, q) = pw.bn_relu_matmul(z, mean, mul, bias, w, residual, stats=True,
                                        impl=impl)
        return jnp.sum(jnp.sin(out)) + 1e-3 * jnp.sum(s * s) + 1e-2 * jnp.sum(q)

    args = (z, mean, mul, bias, w, residual)
    probes = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(m, n))

    def grad(impl):
        """The loss and its gradients, those of z and the residual as dot products with
        ``probes``: every output is replicated, so gathering rows would show in the
        program."""
        def f(*args):
            value, (dz, *others, dr) = jax.value_and_grad(functools.partial(loss, impl),
                                                          argnums=tuple(range(6)))(*args)
            return value, jnp.sum(dz * probes[0]), jnp.sum(dr * probes[1]), others
        return f

    want = jax.jit(grad("xla"))(*args)
    program = sharding.data_parallel(grad("interpret"), mesh)
    rows, rep = sharding.batch_sharding(mesh, ndim=1), sharding.replicated(mesh)
    placed = [sharding.place(a, rows if a.shape[0] == m else rep) for a in args]
    got = program(*placed)
    hlo = program.lower(*placed).compile().as_text()
    return {**_max_diff(got, want, atol=1e-4),
            "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo,
            "per_device_rows": f"f32[{m // DEVICES},{k}]" in hlo}


def _model_parts(mesh) -> dict:
    """PreResNet with the kernels in the data-parallel programs: curve training (the loop's
    runner, also with the curve point's kernel), the evaluation-mode gradient, evaluation,
    and the BatchNorm recomputation, each with the mesh against the same call without it."""
    import jax
    import numpy as np

    from mcu_jax import bn, curves, evaluation, models, sharding
    from mcu_jax.data import Images, load_dataset
    from mcu_jax.mcu import MCUConfig, train_curve

    digits = load_dataset("digits")
    images = Images.from_dataset(digits, "train")
    model = models.create("preresnet110", digits.num_classes, depth=11, pointwise="interpret")
    theta_o, theta_p = (models.init_variables(model, jax.random.PRNGKey(i), (1, 8, 8, 1))
                        for i in (0, 1))
    idx = np.arange(64)
    out = {}
    # with the curve point's kernel (interpreted) as well
    config = MCUConfig(epochs=1, batch_size=16, progress=False, combine="interpret")
    refs = {"train": 90.0, "val": 80.0}
    curve = [train_curve(model, theta_o, theta_p, images, idx[:48], idx[48:], refs, config,
                         jax.random.PRNGKey(2), mesh=m).theta_c for m in (mesh, None)]
    out["curve"] = _max_diff(*curve)
    out["curve"]["moved"] = _max_diff(curve[1], curves.midpoint(theta_o["params"],
                                                                theta_p["params"]))[
        "max_abs_diff"]
    out["gradient"] = _max_diff(*[evaluation.mean_gradient(model, theta_o, images, idx, 32,
                                                            mesh=m)
                                  for m in (mesh, None)], atol=1e-6)
    # The gradient's compiled program gathers no rows (20 all-gathers without the split)
    _, step = evaluation._mesh_programs(mesh)
    split = sharding.batch_sharding(mesh, ndim=1)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), theta_o["params"])
    hlo = step.lower(model, *sharding.replicate((zeros, theta_o, images), mesh),
                     sharding.place(idx[:32].astype(np.int32), split),
                     sharding.place(np.ones(32, np.float32), split)).compile().as_text()
    out["gradient"]["all_gathers"] = hlo.count("all-gather(")
    out["outputs"] = _max_diff(*[evaluation.outputs(model, theta_o, images, idx, 32, mesh=m)
                                 for m in (mesh, None)])
    out["bn"] = _max_diff(*[bn.recompute(model, theta_o, images, idx, 32, mesh=m)["batch_stats"]
                            for m in (mesh, None)])
    return out


def _conv3x3_part(mesh) -> dict:
    """The 3x3 kernels (models/conv3x3.py) in a data-parallel program on images split over
    the mesh: a loss of the output, the statistics and the loss's gradient (the backward
    kernel) against XLA's ops on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mcu_jax import sharding
    from mcu_jax.models import conv3x3

    rng = np.random.default_rng(1)
    z = rng.normal(size=(2 * DEVICES, 4, 4, 16)).astype(np.float32)
    mean, bias = rng.normal(size=(2, 16)).astype(np.float32)
    mul = rng.uniform(0.5, 2.0, size=16).astype(np.float32)
    w = (rng.normal(size=(3, 3, 16, 32)) / 12).astype(np.float32)
    probe = rng.normal(size=z.shape).astype(np.float32)

    def f(impl):
        def loss(*args):
            out, sums = conv3x3.bn_relu_conv3x3(*args, stats=True, impl=impl)
            return jnp.sum(jnp.sin(out)) + 0.01 * jnp.sum(sums[1]), sums

        def run(*args):
            """The loss, the sums and the gradients, z's as a dot product with ``probe``:
            every output is replicated, so gathering rows would show in the program."""
            (value, sums), (dz, *others) = jax.value_and_grad(
                loss, argnums=tuple(range(5)), has_aux=True)(*args)
            return value, sums, jnp.sum(dz * probe), others
        return run

    want = jax.jit(f("xla"))(z, mean, mul, bias, w)
    program = sharding.data_parallel(f("interpret"), mesh)
    rep = sharding.replicated(mesh)
    placed = [sharding.place(z, sharding.batch_sharding(mesh, ndim=4)),
              *(sharding.place(a, rep) for a in (mean, mul, bias, w))]
    hlo = program.lower(*placed).compile().as_text()
    return {**_max_diff(program(*placed), want, atol=1e-4),
            "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo,
            "per_device_rows": "f32[32,16]" in hlo}  # 2 images of 4 x 4 a device


def _chain_part(mesh) -> dict:
    """The chain kernel (models/chain.py) in a data-parallel program on rows split over the
    mesh, against XLA's ops on one device: each device computes its own rows' two
    outputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from test_chain import _operands

    from mcu_jax import sharding
    from mcu_jax.models import chain

    m, k, n, n_next = DEVICES * 40, 16, 64, 32
    args = _operands(m, k, n, n_next, jnp.float32, seed=2)
    probe = np.random.default_rng(2).normal(size=(m, n_next)).astype(np.float32)

    def f(impl):
        """Both outputs reduced (each as a dot product with a probe): every output is
        replicated, so gathering rows would show in the program."""
        def run(*a):
            out, following = chain.matmul_chain(*a, impl=impl)
            return jnp.sum(jnp.sin(out)), jnp.sum(following * probe)
        return run

    want = jax.jit(f("xla"))(*args)
    program = sharding.data_parallel(f("interpret"), mesh)
    rows, rep = sharding.batch_sharding(mesh, ndim=1), sharding.replicated(mesh)
    placed = [sharding.place(a, rows if a.shape[0] == m else rep) for a in args]
    hlo = program.lower(*placed).compile().as_text()
    return {**_max_diff(program(*placed), want, atol=1e-4),
            "all_gather": "all-gather" in hlo,
            "per_device_rows": f"f32[{m // DEVICES},{k}]" in hlo}


def main() -> None:
    import jax

    from mcu_jax import sharding

    mesh = sharding.make_mesh(DEVICES)
    out = {"devices": len(jax.devices()), "kernel": _kernel_part(mesh),
           "conv3x3": _conv3x3_part(mesh), "chain": _chain_part(mesh), **_model_parts(mesh)}
    print("POINTWISE-MESH-JSON " + json.dumps(out), flush=True)


def test_kernels_run_on_each_devices_rows():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES}"])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())],
                          cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("POINTWISE-MESH-JSON "))
    out = json.loads(line.removeprefix("POINTWISE-MESH-JSON "))
    assert out["devices"] == DEVICES
    for kernel in (out["kernel"], out["conv3x3"]):
        assert kernel["allclose"], kernel
        # Each device runs the kernels on its own rows (no gather of the whole batch); the
        # statistics (and the replicated operands' gradients) are summed across the devices.
        assert kernel["per_device_rows"] and not kernel["all_gather"] and kernel["all_reduce"]
    assert out["chain"]["allclose"] and out["chain"]["per_device_rows"], out["chain"]
    assert not out["chain"]["all_gather"], out["chain"]
    for part in ("curve", "gradient", "outputs", "bn"):
        assert out[part]["allclose"], (part, out[part])
    assert out["gradient"]["all_gathers"] == 0
    assert out["curve"]["moved"] > 1e-4, "curve training did not change theta_c"


if __name__ == "__main__":
    main()
