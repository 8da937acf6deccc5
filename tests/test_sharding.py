"""Several devices: data-parallel training, curve training, methods, evaluation-mode
gradients and evaluation; t-parallel sweeps.

XLA fixes the number of host devices when jax is first imported, so the comparisons run in a
subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: this file,
run as a script (``python tests/test_sharding.py``), trains and sweeps with a mesh of 8 CPU
devices and without one, on the digits set with cnn_small, and prints a JSON summary that
the tests below check; with the argument ``multihost`` it is one of two processes of a
multi-host run (2 CPU devices each). The errors (device count, divisibility) are checked
in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEVICES = 8
RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------- the script


def _max_diff(a, b, atol=None) -> dict:
    """Largest absolute difference and whether every leaf is allclose (RTOL, ``atol`` or
    ATOL)."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             if np.size(x) else 0.0 for x, y in zip(la, lb, strict=True)]
    close = all(np.allclose(np.asarray(x), np.asarray(y), rtol=RTOL,
                            atol=ATOL if atol is None else atol)
                for x, y in zip(la, lb, strict=True))
    return {"max_abs_diff": max(diffs), "allclose": bool(close)}


def _replicated_on(tree, mesh) -> bool:
    """Every array leaf fully replicated on all devices of ``mesh``."""
    import jax

    return all(
        leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(mesh.devices.flat)
        for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)
    )


def main() -> None:
    import shutil
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mcu_jax import loop, methods, sharding, sweep, train
    from mcu_jax.data import Images, load_dataset, make_split
    from mcu_jax.mcu import MCUConfig, train_curve
    from mcu_jax.models import create, init_variables

    t_start = time.perf_counter()
    out: dict = {"devices": len(jax.devices()), "platform": jax.default_backend()}
    mesh = sharding.make_mesh(DEVICES)
    digits = load_dataset("digits")
    split = make_split(digits, "random", seed=0)
    images = Images.from_dataset(digits, "train")
    test_images = Images.from_dataset(digits, "test")
    model = create("cnn_small", digits.num_classes)
    v0 = init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    key = jax.random.PRNGKey(1)
    pool = np.arange(640)  # 10 steps of 64 per epoch

    # train.fit: per-step (CPU's unrolled) path, with and without a mesh.
    config = train.TrainConfig(epochs=1, batch_size=64, lr=0.05, steps_per_call=4,
                               progress=False)
    single, hist1 = train.fit(model, v0, images, pool, config, key)
    multi, hist8 = train.fit(model, v0, images, pool, config, key, mesh=mesh)
    out["fit"] = _max_diff(single, multi)
    out["fit"]["loss"] = [hist1[0]["loss"], hist8[0]["loss"]]
    out["fit"]["replicated"] = _replicated_on(multi, mesh)
    out["fit"]["moved"] = _max_diff(v0["params"], single["params"])["max_abs_diff"]
    # The models' fused BatchNorm (hand-written backward pass) on the mesh too: its sums over
    # the split batch are all-reduced like the composed ops'.
    fused = model.clone(fused_bn=True)
    fused_single, _ = train.fit(fused, v0, images, pool, config, key)
    out["fit_fused"] = _max_diff(fused_single, train.fit(fused, v0, images, pool, config, key,
                                                         mesh=mesh)[0])
    out["fit_fused"]["vs_unfused"] = _max_diff(single, fused_single)["max_abs_diff"]

    # The scanned (accelerator) runner with a mesh, through loop.run_epochs directly, against
    # the scanned runner on one device. XLA's CPU backend rounds the scanned step differently
    # from the per-step one, and ten SGD steps at lr 0.05 amplify that (and the mesh's other
    # summation order) to about 2.5e-5 (jax 0.10 and 0.11): compared at atol 1e-4.
    tx = train.make_optimizer(config, 10)
    state = train.TrainState(v0["params"], v0["batch_stats"], tx.init(v0["params"]))
    step = train.make_step(model, train.cross_entropy_loss, tx)
    loop_cfg = loop.LoopConfig(epochs=1, batch_size=64, steps_per_call=4, progress=False)
    scanned_one, _ = loop.run_epochs(loop.make_runner(step, unrolled=False), state,
                                     (images, None), pool, key, loop_cfg)
    scanned, _ = loop.run_epochs(loop.make_runner(step, unrolled=False, mesh=mesh), state,
                                 (images, None), pool, key, loop_cfg, mesh=mesh)
    out["fit_scanned"] = _max_diff(scanned_one.variables, scanned.variables, atol=1e-4)
    out["fit_scanned"]["vs_per_step"] = _max_diff(single, scanned_one.variables)["max_abs_diff"]
    out["fit_scanned"]["replicated"] = _replicated_on(scanned, mesh)

    # The batch really is split: the compiled step all-reduces (gradients, BN statistics).
    one = jax.jit(step)
    rep = sharding.replicated(mesh)
    hlo = one.lower(sharding.place(state, rep), sharding.place((images, None), rep),
                    sharding.place(np.arange(64, dtype=np.int32),
                                   sharding.batch_sharding(mesh, ndim=1)),
                    sharding.place(key, rep)).compile().as_text()
    # cnn_small's first convolution writes (batch, 8, 8, 32): 8 rows per device, not 64.
    out["step_split"] = {"all_reduce": "all-reduce" in hlo,
                         "per_device_batch": "f32[8,8,8,32]" in hlo,
                         "whole_batch": "f32[64,8,8,32]" in hlo}

    # Checkpoints of the replicated state resume exactly (kill after epoch 1 of 2).
    ck_cfg = train.TrainConfig(epochs=2, batch_size=64, lr=0.05, steps_per_call=2,
                               progress=False)
    straight, _ = train.fit(model, v0, images, pool[:256], ck_cfg, key, mesh=mesh)
    with tempfile.TemporaryDirectory() as tmp:
        train.fit(model, v0, images, pool[:256], ck_cfg, key, mesh=mesh, checkpoint_dir=tmp)
        shutil.rmtree(Path(tmp) / "2")
        resumed, hist = train.fit(model, v0, images, pool[:256], ck_cfg, key, mesh=mesh,
                                  checkpoint_dir=tmp)
    out["resume"] = {
        "equal": all(np.array_equal(a, b) for a, b in
                     zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True)),
        "epochs": [h["epoch"] for h in hist],
        "replicated": _replicated_on(resumed, mesh),
    }

    # Batch size not divisible by the device count.
    try:
        train.fit(model, v0, images, pool, train.TrainConfig(epochs=1, batch_size=60,
                                                             progress=False), key, mesh=mesh)
        out["divisibility_error"] = None
    except ValueError as err:
        out["divisibility_error"] = str(err)

    # Curve training (MCU_beta) with and without a mesh.
    theta_o, theta_p = single, init_variables(model, jax.random.PRNGKey(2), (1, 8, 8, 1))
    refs = {"train": 90.0, "val": 85.0}
    subset, forget = split.retain_subset[:320], split.forget[:64]
    mcu_cfg = MCUConfig(epochs=1, batch_size=64, steps_per_call=3, progress=False)
    c1 = train_curve(model, theta_o, theta_p, images, subset, forget, refs, mcu_cfg, key)
    c8 = train_curve(model, theta_o, theta_p, images, subset, forget, refs, mcu_cfg, key,
                     mesh=mesh)
    out["curve"] = _max_diff(c1.theta_c, c8.theta_c)
    out["curve"]["beta"] = [c1.history[0]["beta_mean"], c8.history[0]["beta_mean"]]
    out["curve"]["replicated"] = _replicated_on(c8.theta_c, mesh)
    midpoint = jax.tree.map(lambda a, b: (a + b) / 2, theta_o["params"], theta_p["params"])
    out["curve"]["moved"] = _max_diff(midpoint, c1.theta_c)["max_abs_diff"]

    # A method (NegGrad+) through MethodData.mesh.
    small = dataclass_replace(split, retain=split.retain[:256], forget=split.forget[:64])
    data1 = methods.MethodData(images, test_images, small, (1, 8, 8, 1))
    data8 = methods.MethodData(images, test_images, small, (1, 8, 8, 1), mesh=mesh)
    m_cfg = methods.default_config("neggrad", epochs=1, batch_size=64, progress=False)
    r1 = methods.run("neggrad", model, theta_o, data1, m_cfg, key)
    r8 = methods.run("neggrad", model, theta_o, data8, m_cfg, key)
    out["neggrad"] = _max_diff(r1.variables, r8.variables)

    # Evaluation-mode gradients, data parallel: 300 indices (4 batches of 64, the last
    # padded), a set smaller than one batch (13 -> one batch of 16) and the mask's pair.
    from types import SimpleNamespace

    from mcu_jax import evaluation, experiment, masks

    gsec = time.perf_counter()
    retain, few = split.retain[:300], split.forget[:13]
    g1 = evaluation.mean_gradient(model, theta_o, images, retain, 64)
    g8 = evaluation.mean_gradient(model, theta_o, images, retain, 64, mesh=mesh)
    out["mean_gradient"] = _max_diff(g1, g8)
    out["mean_gradient"]["replicated"] = _replicated_on(g8, mesh)
    out["mean_gradient"]["scale"] = max(float(np.abs(np.asarray(g)).max())
                                        for g in jax.tree.leaves(g1))
    out["mean_gradient_small"] = _max_diff(
        evaluation.mean_gradient(model, theta_o, images, few, 64),
        evaluation.mean_gradient(model, theta_o, images, few, 64, mesh=mesh))
    m1 = masks.mask_gradients(model, theta_o, images, retain, forget, 64)
    m8 = masks.mask_gradients(model, theta_o, images, retain, forget, 64, mesh=mesh)
    out["mask_gradients"] = _max_diff(m1, m8)
    # with the training augmentation (random crops and flips of the 8x8 digits)
    cropped, key = images.replace(augment="crop_flip"), jax.random.PRNGKey(5)
    out["mask_gradients_augmented"] = _max_diff(
        masks.mask_gradients(model, theta_o, cropped, retain, forget, 64, augment_key=key),
        masks.mask_gradients(model, theta_o, cropped, retain, forget, 64, mesh=mesh,
                             augment_key=key))
    try:
        evaluation.mean_gradient(model, theta_o, images, retain, 60, mesh=mesh)
        out["gradient_divisibility_error"] = None
    except ValueError as err:
        out["gradient_divisibility_error"] = str(err)

    # Evaluation, data parallel: batch 500 (rounded to 504; 300 indices -> one padded batch
    # of 304) and batch 64 (4 full batches, then 44 padded to 48), and experiment's metrics.
    for bs in (500, 64):
        o1 = evaluation.outputs(model, theta_o, images, retain, bs)
        o8 = evaluation.outputs(model, theta_o, images, retain, bs, mesh=mesh)
        out[f"outputs_{bs}"] = {
            "shape": [o1["prob"].shape[0], o8["prob"].shape[0]],
            "correct_equal": bool(np.array_equal(o1["correct"], o8["correct"])),
            "loss": _max_diff(o1["loss"], o8["loss"]),
            "prob": _max_diff(o1["prob"], o8["prob"]),
        }
    sets = {"retain": (images, retain), "forget": (images, forget),
            "test": (test_images, split.test[:150]), "empty": (images, [])}
    e1 = evaluation.evaluate_sets(model, theta_o, sets, 64)
    e8 = evaluation.evaluate_sets(model, theta_o, sets, 64, mesh=mesh)
    out["evaluate_sets"] = {"equal": all(e1[k] == e8[k] or np.isnan(e1[k]) and np.isnan(e8[k])
                                         for k in sets), "acc": [e1, e8]}
    prob = SimpleNamespace(model=model, train=images, test=test_images, split=dataclass_replace(
        split, retain=retain, forget=forget, test=split.test[:150]))
    x1 = experiment.evaluate_model(prob, theta_o, True, 0)
    x8 = experiment.evaluate_model(prob, theta_o, True, 0, mesh=mesh)
    out["evaluate_model"] = {
        "acc_equal": {k: v for k, v in x1.items() if k != "MIA"}
        == {k: v for k, v in x8.items() if k != "MIA"},
        "mia": [x1["MIA"], x8["MIA"]],
    }
    # The compiled gradient and evaluation steps really split the batch (8 rows a device).
    run8, grad8 = evaluation._mesh_programs(mesh)
    rep_args = sharding.replicate((theta_o, images), mesh)
    zeros = sharding.replicate(jax.tree.map(np.zeros_like, theta_o["params"]), mesh)
    one_batch = sharding.place((np.arange(64, dtype=np.int32), np.ones(64, np.float32)),
                               sharding.batch_sharding(mesh, ndim=1))
    hlos = {
        "gradient": grad8.lower(model, zeros, *rep_args, *one_batch).compile().as_text(),
        "eval": run8.lower(model, *rep_args, sharding.place(
            np.arange(128, dtype=np.int32).reshape(2, 64),
            sharding.batch_sharding(mesh, ndim=2))).compile().as_text(),
    }
    out["eval_split"] = {name: {"per_device_batch": "f32[8,8,8,32]" in hlo,
                                "whole_batch": "f32[64,8,8,32]" in hlo}
                         for name, hlo in hlos.items()}
    out["eval_split"]["gradient"]["all_reduce"] = "all-reduce" in hlos["gradient"]
    out["gradient_and_eval_seconds"] = time.perf_counter() - gsec

    # BatchNorm recomputation, data parallel: 300 indices at batch 64 (a rest of 44, run
    # whole on every device), 200 (a rest of 8, split), and sets smaller than one batch (13
    # at 64, 30 at 32: one batch of the set's size, run whole), NegTV through MethodData.mesh.
    from mcu_jax import bn

    for n, bs in ((300, 64), (200, 64), (13, 64), (30, 32)):
        b1 = bn.recompute(model, theta_o, images, split.retain[:n], bs)
        b8 = bn.recompute(model, theta_o, images, split.retain[:n], bs, mesh=mesh)
        out[f"bn_{n}"] = _max_diff(b1, b8)
        out[f"bn_{n}"]["replicated"] = _replicated_on(b8, mesh)
    batches, _ = bn.bn_batches(split.retain[:256], 64)
    hlo = bn._mesh_program(mesh).lower(
        model, *sharding.replicate((theta_o["params"], theta_o["batch_stats"], images), mesh),
        sharding.place(batches, sharding.batch_sharding(mesh, ndim=2)), None).compile().as_text()
    out["bn_split"] = {"per_device_batch": "f32[8,8,8,32]" in hlo,
                       "whole_batch": "f32[64,8,8,32]" in hlo}
    try:
        bn.recompute(model, theta_o, images, split.retain[:300], 60, mesh=mesh)
        out["bn_divisibility_error"] = None
    except ValueError as err:
        out["bn_divisibility_error"] = str(err)
    tv_cfg = methods.default_config("negtv", epochs=1, batch_size=64, progress=False)
    out["negtv"] = _max_diff(methods.run("negtv", model, theta_o, data1, tv_cfg, key).variables,
                             methods.run("negtv", model, theta_o, data8, tv_cfg, key).variables)

    # The sweep, t parallel: vmap in chunks of 3 and map in one chunk, each padded to 8 t.
    points = [theta_o["params"], c1.theta_c, theta_p["params"]]
    ts = np.linspace(0.0, 1.0, 5)
    kwargs = dict(bn_batch_size=64, eval_batch_size=128, return_probs=True)
    bn_set = (images, split.retain[:256])
    evals = {"forget": (images, split.forget[:100]), "test": (test_images, split.test[:150])}
    base = sweep.sweep(model, points, ts, theta_o["batch_stats"], bn_set, evals,
                       strategy="vmap", **kwargs)
    for strategy, chunk in (("vmap", 3), ("map", None)):
        res = sweep.sweep(model, points, ts, theta_o["batch_stats"], bn_set, evals,
                          strategy=strategy, chunk_size=chunk, mesh=mesh, **kwargs)
        name = f"sweep_{strategy}" + (f"_chunk{chunk}" if chunk else "")
        out[name] = {
            "acc_equal": all(np.allclose(base.acc[k], res.acc[k], atol=1e-4) for k in evals),
            "probs": _max_diff(base.probs, res.probs),
            "acc": {k: [base.acc[k].tolist(), res.acc[k].tolist()] for k in evals},
        }
    # MCU in one call (curve data parallel, sweep t parallel) with and without a mesh.
    from mcu_jax import pipeline

    tiny = dataclass_replace(split, retain_subset=subset, forget=forget,
                             retain=split.retain[:512], test=split.test[:150])
    run = dict(mcu_config=mcu_cfg, selection_config=pipeline.SelectionConfig(num_t=5))
    p1 = pipeline.run_mcu(model, theta_o, theta_p, images, test_images, tiny, refs, key, **run)
    folder = tempfile.mkdtemp(prefix="mcu_mesh_")  # its models are loaded on one device
    p8 = pipeline.run_mcu(model, theta_o, theta_p, images, test_images, tiny, refs, key,
                          mesh=mesh, out_dir=folder, **run)
    out["pipeline"] = {
        "t_star": [p1.t_star, p8.t_star],
        "gaps_close": bool(np.allclose(p1.gaps, p8.gaps, atol=1e-3)),
        "theta_c": _max_diff(p1.theta_c, p8.theta_c),
        "folder": folder,
    }
    # Leaves on different devices are checked for NaN per device set.
    from mcu_jax import pytrees

    spread = {"a": jax.device_put(jnp.ones(2), jax.devices()[0]),
              "b": jax.device_put(jnp.array([jnp.nan]), jax.devices()[-1])}
    try:
        pytrees.check_finite("spread", spread)
        out["finite_spread"] = None
    except ValueError as err:
        out["finite_spread"] = str(err)
    # A mesh of n devices takes the first n; the t of a sweep are split over the mesh.
    out["mesh_layout"] = {
        "first_devices": sharding.make_mesh(2).devices.tolist() == jax.devices()[:2],
        "t_split": sharding.t_spec(mesh) == jax.sharding.PartitionSpec("data"),
    }
    out["seconds"] = time.perf_counter() - t_start
    print("SHARDING-JSON " + json.dumps(out))


def main_multihost() -> None:
    """One of two processes (2 CPU devices each) of a multi-host run: the mesh spans the 4
    devices of both; fit and the sweep are compared with this process's single-device run."""
    from mcu_jax import sharding

    sharding.initialize_distributed(initialization_timeout=60)  # JAX_* variables
    import jax
    import numpy as np

    from mcu_jax import sweep, train
    from mcu_jax.data import Images, load_dataset, make_split
    from mcu_jax.models import create, init_variables

    mesh = sharding.make_mesh()
    digits = load_dataset("digits")
    split = make_split(digits, "random", seed=0)
    images = Images.from_dataset(digits, "train")
    model = create("cnn_small", digits.num_classes)
    v0 = init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    key = jax.random.PRNGKey(1)
    config = train.TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False)
    single, _ = train.fit(model, v0, images, np.arange(256), config, key)
    multi, _ = train.fit(model, v0, images, np.arange(256), config, key, mesh=mesh)
    theta_p = init_variables(model, jax.random.PRNGKey(2), (1, 8, 8, 1))
    points = [single["params"], multi["params"], theta_p["params"]]
    args = (model, points, np.linspace(0.0, 1.0, 3), single["batch_stats"],
            (images, split.retain[:128]), {"forget": (images, split.forget[:100])})
    base = sweep.sweep(*args, strategy="vmap", return_probs=True)
    res = sweep.sweep(*args, strategy="vmap", return_probs=True, mesh=mesh)
    try:  # the first 2 devices belong to process 0: process 1 would own no part of the mesh
        sharding.make_mesh(2)
        subset_error = None
    except ValueError as err:
        subset_error = str(err)
    # A stop signal that reaches one process only (process 0, after the second chunk): every
    # process stops at the same boundary with the same exit code and one checkpoint (they
    # used to deadlock), and the rerun resumes to the uninterrupted result.
    import os
    import signal

    from mcu_jax import loop

    per_step = train.TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False,
                                 steps_per_call=1)
    straight, _ = train.fit(model, v0, images, np.arange(256), per_step, key, mesh=mesh)
    check, chunks = loop._check_finite, []

    def signalling(metrics, first_step, *rest):
        chunks.append(first_step)
        if jax.process_index() == 0 and len(chunks) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return check(metrics, first_step, *rest)

    loop._check_finite = signalling
    ckpt_dir = os.environ["MCU_TEST_CKPT"]
    try:
        train.fit(model, v0, images, np.arange(256), per_step, key, mesh=mesh,
                  checkpoint_dir=ckpt_dir)
        stopped = None
    except SystemExit as err:
        stopped = err.code
    finally:
        loop._check_finite = check
    resumed, history = train.fit(model, v0, images, np.arange(256), per_step, key, mesh=mesh,
                                 checkpoint_dir=ckpt_dir)
    # Replacing a step in a shared folder: process 0 renames it away between two barriers;
    # afterwards no process lists it and nothing is left behind.
    from pathlib import Path

    from mcu_jax.checkpoint import Checkpointer

    with Checkpointer(ckpt_dir) as ckpt:
        steps_before = ckpt._manager.all_steps()
        ckpt.delete(max(steps_before))
        out_delete = {
            "before": sorted(steps_before), "after": sorted(ckpt._manager.all_steps()),
            "on_disk": sorted(p.name for p in Path(ckpt_dir).iterdir()),
        }
    out = {
        "delete": out_delete,
        "signal": {"stopped": stopped, "chunks": len(chunks),
                   "resume": _max_diff(straight, resumed), "epochs": len(history)},
        "subset_error": subset_error,
        "process": jax.process_index(), "processes": jax.process_count(),
        "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
        "fit": _max_diff(single, multi),
        "sweep_acc": [base.acc["forget"].tolist(), res.acc["forget"].tolist()],
        "sweep_probs": _max_diff(base.probs, res.probs),
    }
    print("SHARDING-JSON " + json.dumps(out), flush=True)
    jax.distributed.shutdown()


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ----------------------------------------------------------------------------- the tests


ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int, **extra: str) -> dict:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _summary(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("SHARDING-JSON "))
    return json.loads(line.removeprefix("SHARDING-JSON "))


def test_eight_devices_equal_one():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=ROOT,
                          env=_env(DEVICES), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = _summary(proc.stdout)
    print(json.dumps(out, indent=1), f"\nsubprocess: {time.perf_counter() - start:.1f} s")
    assert out["devices"] == DEVICES and out["platform"] == "cpu"
    assert out["fit"]["moved"] > 1e-3, "training did not change the parameters"
    for part in ("fit", "fit_scanned", "fit_fused", "curve", "neggrad", "negtv", "bn_300",
                 "bn_200", "bn_13", "bn_30"):
        assert out[part]["allclose"], (part, out[part])
    assert abs(out["fit"]["loss"][0] - out["fit"]["loss"][1]) < 1e-4
    assert out["fit_fused"]["vs_unfused"] < 1e-4  # the same training, rounded differently
    assert out["fit"]["replicated"] and out["fit_scanned"]["replicated"]
    assert out["curve"]["replicated"] and out["bn_300"]["replicated"]
    assert out["bn_split"]["per_device_batch"] and not out["bn_split"]["whole_batch"]
    err = out["bn_divisibility_error"]
    assert err is not None and "60" in err and "8 devices" in err
    assert out["curve"]["beta"][0] == out["curve"]["beta"][1]
    assert out["curve"]["moved"] > 1e-3, "curve training did not change theta_c"
    assert out["resume"] == {"equal": True, "epochs": [1, 2], "replicated": True}
    split = out["step_split"]
    assert split["all_reduce"] and split["per_device_batch"] and not split["whole_batch"], (
        "the batch was not split across the devices", split)
    err = out["divisibility_error"]
    assert err is not None and "60" in err and "not divisible" in err and "8 devices" in err
    for name in ("sweep_vmap_chunk3", "sweep_map"):
        assert out[name]["acc_equal"], (name, out[name]["acc"])
        assert out[name]["probs"]["allclose"], (name, out[name]["probs"])
    for part in ("mean_gradient", "mean_gradient_small", "mask_gradients",
                 "mask_gradients_augmented"):
        assert out[part]["allclose"], (part, out[part])
    assert out["mean_gradient"]["replicated"] and out["mean_gradient"]["scale"] > 1e-3
    err = out["gradient_divisibility_error"]
    assert err is not None and "batch_size=60" in err and "8 devices" in err
    for bs in (500, 64):
        o = out[f"outputs_{bs}"]
        assert o["shape"] == [300, 300] and o["correct_equal"], (bs, o)
        assert o["loss"]["allclose"] and o["prob"]["allclose"], (bs, o)
    assert out["evaluate_sets"]["equal"], out["evaluate_sets"]
    assert out["evaluate_model"]["acc_equal"], out["evaluate_model"]
    assert abs(out["evaluate_model"]["mia"][0] - out["evaluate_model"]["mia"][1]) < 1e-3
    for name, got in out["eval_split"].items():
        assert got["per_device_batch"] and not got["whole_batch"], (name, got)
    assert out["eval_split"]["gradient"]["all_reduce"]
    assert out["pipeline"]["theta_c"]["allclose"] and out["pipeline"]["gaps_close"]
    # The models a mesh run saved load in this one-device process.
    import shutil

    import jax
    import numpy as np

    from mcu_jax import checkpoint

    folder = Path(out["pipeline"]["folder"])
    for name in ("theta_c", "model"):
        variables, _ = checkpoint.load_model(folder / name)
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(variables))
    shutil.rmtree(folder)
    assert out["finite_spread"] == "spread: leaf b has a NaN or infinite value"
    assert abs(out["pipeline"]["t_star"][0] - out["pipeline"]["t_star"][1]) < 1e-6
    assert out["mesh_layout"] == {"first_devices": True, "t_split": True}


def test_two_processes_equal_one(tmp_path):
    """Multi-host on one machine: 2 processes x 2 CPU devices joined by
    ``initialize_distributed`` (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "multihost"], cwd=ROOT,
            env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(i), MCU_TEST_CKPT=str(tmp_path / "ckpt")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, stderr[-4000:]
            outputs.append(_summary(stdout))
    finally:
        for p in procs:  # a process left waiting for its peer
            if p.poll() is None:
                p.kill()
                p.communicate()
    print(json.dumps(outputs, indent=1))
    assert sorted(o["process"] for o in outputs) == [0, 1]
    for out in outputs:
        assert (out["processes"], out["devices"], out["local_devices"]) == (2, 4, 2)
        assert out["fit"]["allclose"], out["fit"]
        assert out["sweep_acc"][0] == out["sweep_acc"][1]
        assert out["sweep_probs"]["allclose"], out["sweep_probs"]
        assert "without a device in the mesh" in (out["subset_error"] or ""), out
        # SIGTERM reached process 0 only; both stopped after the same chunk, with exit code
        # 143, and resumed from the one checkpoint to the uninterrupted result.
        sig = out["signal"]
        assert (sig["stopped"], sig["chunks"], sig["epochs"]) == (143, 2, 2), sig
        assert sig["resume"]["allclose"], sig
        gone = out["delete"]
        assert gone["after"] == gone["before"][:-1] and gone["after"], gone
        assert gone["on_disk"] == [str(s) for s in gone["after"]], gone


def test_mesh_errors_in_process():
    import jax
    import pytest

    from mcu_jax import sharding

    n = len(jax.devices())
    mesh = sharding.make_mesh()
    assert mesh.size == n and mesh.axis_names == ("data",)
    assert sharding.make_mesh(1, axis="batch").axis_names == ("batch",)
    with pytest.raises(ValueError, match=rf"num_devices={n + 2} but only {n} cpu device"):
        sharding.make_mesh(n + 2)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_mesh(n + 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_devices"):
            sharding.make_mesh(bad)
    with pytest.raises(ValueError, match="expected a jax.sharding.Mesh"):
        sharding.replicated("data")
    # Divisibility is checked against the mesh's device count (here a pretended 8).
    sharding.check_batch_size(64, None)
    sharding.check_batch_size(64, mesh)
    with pytest.raises(ValueError, match="batch_size=60 is not divisible by the 8 devices"):
        _check_fake(sharding, 60, 8)


def _check_fake(sharding, batch_size, n):
    """check_batch_size's message for a mesh of ``n`` devices, without needing n devices."""
    from unittest import mock

    with mock.patch.object(sharding, "num_shards", return_value=n):
        sharding.check_batch_size(batch_size, object())


def test_single_device_mesh_is_the_same_path(digits, digits_images, small_model):
    """A mesh of one device gives the no-mesh result (same code, same device)."""
    import jax
    import numpy as np

    from mcu_jax import sharding, train
    from mcu_jax.models import init_variables

    train_images, _ = digits_images
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    config = train.TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False)
    pool = np.arange(128)
    a, _ = train.fit(small_model, v0, train_images, pool, config, jax.random.PRNGKey(3))
    b, _ = train.fit(small_model, v0, train_images, pool, config, jax.random.PRNGKey(3),
                     mesh=sharding.make_mesh(1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_data_parallel_programs_trace_under_their_mesh():
    """sharding.data_parallel: jax.jit with the outputs replicated on the mesh, traced (when
    called and when lowered) with the mesh as JAX's context mesh, which code inside reads
    (the fused 1x1 kernels split their rows by it); nothing is left set afterwards."""
    import jax
    import jax.numpy as jnp

    from mcu_jax import sharding

    mesh = sharding.make_mesh(1)
    seen = []

    def double(x):
        seen.append(jax.sharding.get_abstract_mesh().axis_names)
        return 2 * x

    program = sharding.data_parallel(double, mesh)
    assert program.__name__ == "double"
    out = program(jnp.arange(4.0))
    assert out.sharding == sharding.replicated(mesh) and float(out[3]) == 6.0
    assert "multiply" in program.lower(jnp.arange(3.0)).as_text()
    assert seen == [("data",), ("data",)]  # traced twice (two shapes), both under the mesh
    assert jax.sharding.get_abstract_mesh().empty


def test_mesh_reaches_gradients_and_evaluation(monkeypatch, digits_images, digits_split,
                                               small_model):
    """compute_mask, SalUn (MethodData.mesh) and train.reference_accuracies hand their mesh
    to the gradient / evaluation, whose one-device-mesh path equals the no-mesh one."""
    import jax
    import numpy as np
    import pytest

    from mcu_jax import evaluation, methods, pipeline, sharding, train
    from mcu_jax.methods import salun
    from mcu_jax.models import init_variables

    train_images, test_images = digits_images
    mesh = sharding.make_mesh(1)
    v0 = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    split = dataclass_replace(digits_split, retain=digits_split.retain[:200],
                              forget=digits_split.forget[:40], val=digits_split.val[:50],
                              test=digits_split.test[:70])
    cfg = pipeline.MaskConfig(k=0.5, k_r=0.1, batch_size=64)
    assert (pipeline.compute_mask(small_model, v0, train_images, split, cfg)
            == pipeline.compute_mask(small_model, v0, train_images, split, cfg, mesh))
    refs = [train.reference_accuracies(small_model, v0, train_images, test_images, split, m)
            for m in (None, mesh)]
    assert refs[0] == refs[1]

    seen = []

    class Stop(Exception):
        pass

    def recorder(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("mesh"))
        raise Stop

    monkeypatch.setattr(salun.evaluation, "mean_gradient", recorder)
    data = methods.MethodData(train_images, test_images, split, (1, 8, 8, 1), mesh=mesh)
    with pytest.raises(Stop):
        methods.run("salun", small_model, v0, data,
                    methods.default_config("salun", progress=False), jax.random.PRNGKey(0))
    assert seen == [mesh]
    monkeypatch.undo()
    o1 = evaluation.outputs(small_model, v0, train_images, split.retain, 64)
    o8 = evaluation.outputs(small_model, v0, train_images, split.retain, 64, mesh=mesh)
    for k in o1:
        np.testing.assert_allclose(o1[k], o8[k], rtol=1e-6, atol=1e-7)


def test_initialize_distributed_reads_env(monkeypatch):
    from unittest import mock

    import pytest

    from mcu_jax import sharding

    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    with mock.patch("jax.distributed.initialize") as init:
        sharding.initialize_distributed("10.0.0.1:1234")
    init.assert_called_once_with(coordinator_address="10.0.0.1:1234", num_processes=2,
                                 process_id=1, local_device_ids=None)
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id=2; expected an int in \[0, 2\)"):
        sharding.initialize_distributed("10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        sharding.initialize_distributed("10.0.0.1:1234")


if __name__ == "__main__":
    main_multihost() if sys.argv[1:] == ["multihost"] else main()
