"""Reliability: resume after signals and kills, atomic checkpoints, run folders,
determinism per seed and clear errors for bad input. See docs/reliability.md."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import checkpoint, cli, loop, masks, mcu, pipeline, runs, sweep
from mcu_jax.checkpoint import Checkpointer
from mcu_jax.data import load_dataset, make_split
from mcu_jax.mcu import MCUConfig

# ------------------------------------------------------------------------------------------
# The loop under signals, with a cheap order-sensitive stand-in for a compiled step
# ------------------------------------------------------------------------------------------

POOL = np.arange(30)  # batch 4: 7 steps per epoch, chunks of 2 -> boundaries 2, 4, 6, 7
CFG = loop.LoopConfig(epochs=3, batch_size=4, steps_per_call=2, progress=False)
KEY = jax.random.PRNGKey(0)
STATE0 = {"acc": jnp.int32(1)}


def fake_runner(state, consts, batches, keys, n_valid=None):
    """acc <- 3 acc + sum(batch) + bits(key), per valid step: any change of order, batch or
    key changes the result."""
    del consts
    acc, out = state["acc"], []
    for i in range(batches.shape[0] if n_valid is None else n_valid):
        acc = acc * 3 + jnp.sum(batches[i]) + jax.random.bits(keys[i]).astype(jnp.int32)
        out.append(acc.astype(jnp.float32))
    return {"acc": acc}, {"loss": jnp.stack(out), "n": jnp.full(len(out), 4, jnp.int32)}


def signalling(signals_at: dict[int, list[int]], runner=fake_runner):
    """A runner that sends itself ``signals_at[call]`` (signal numbers) during that call."""
    calls = [0]

    def run(state, consts, batches, keys, n_valid=None):
        calls[0] += 1
        for sig in signals_at.get(calls[0], []):
            os.kill(os.getpid(), sig)
        return runner(state, consts, batches, keys, n_valid)

    return run


@pytest.fixture(scope="module")
def straight():
    """The uninterrupted run: final state and history."""
    return loop.run_epochs(fake_runner, STATE0, None, POOL, KEY, CFG)


def _resume(directory, cfg=CFG, runner=fake_runner):
    with Checkpointer(directory) as ckpt:
        return loop.run_epochs(runner, STATE0, None, POOL, KEY, cfg, ckpt)


def _latest_meta(directory) -> tuple[int, dict]:
    with Checkpointer(directory) as ckpt:
        step = ckpt.latest_step()
        _, meta = ckpt.restore(STATE0)
    return step, meta


def _same(a, b):
    (sa, ha), (sb, hb) = a, b
    assert int(sa["acc"]) == int(sb["acc"])
    assert ha == hb


@pytest.mark.parametrize("sig, exc", [(signal.SIGTERM, SystemExit), (signal.SIGINT,
                                                                      KeyboardInterrupt)])
def test_signal_mid_epoch_saves_then_resume_is_exact(tmp_path, straight, sig, exc, capsys):
    before = signal.getsignal(sig)
    # Call 6 is the second chunk of epoch 2: the stop comes after step 4 of 7.
    with pytest.raises(exc) as info, Checkpointer(tmp_path) as ckpt:
        loop.run_epochs(signalling({6: [sig]}), STATE0, None, POOL, KEY, CFG, ckpt)
    if exc is SystemExit:
        assert info.value.code == 143
    assert signal.getsignal(sig) is before  # handlers restored
    assert "received; saved the state after step 4 of epoch 2" in capsys.readouterr().err
    step, meta = _latest_meta(tmp_path)
    assert step == 2 and meta["epoch"] == 1 and meta["step"] == 4
    assert len(meta["history"]) == 1 and meta["partial"]["loss"]["shape"] == [4]
    _same(_resume(tmp_path), straight)


def test_resumed_run_counts_the_time_of_every_session(tmp_path, straight):
    """Checkpoints carry the wall-clock seconds trained so far, summed over sessions, so a
    resumed run's minutes (RTE) include the sessions before the kill."""

    def slow(state, consts, batches, keys, n_valid=None):
        time.sleep(0.05)
        return fake_runner(state, consts, batches, keys, n_valid)

    assert loop.earlier_seconds(tmp_path / "none") == 0.0
    with pytest.raises(SystemExit), Checkpointer(tmp_path) as ckpt:  # stops in call 6
        loop.run_epochs(signalling({6: [signal.SIGTERM]}, slow), STATE0, None, POOL, KEY,
                        CFG, ckpt)
    first = loop.earlier_seconds(tmp_path)
    assert first >= 6 * 0.05
    _same(_resume(tmp_path, runner=slow), straight)  # 12 calls in all, 6 of them now
    total = loop.earlier_seconds(tmp_path)
    assert total >= 12 * 0.05 and total >= first + 6 * 0.05


def test_resumed_method_reports_every_session(tmp_path, monkeypatch):
    from mcu_jax.methods import MethodConfig, MethodResult, registry

    with Checkpointer(tmp_path / "progress") as ckpt:  # an earlier session trained 90 s
        ckpt.save(1, STATE0, {"epoch": 1, "seconds": 90.0})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register("half_minute")
    def half_minute(model, theta_o, data, config, key, *, checkpoint_dir=None):
        return MethodResult(variables=theta_o, minutes=0.5, history=[])

    theta = {"params": {"w": jnp.ones(2)}, "batch_stats": {}}
    out = registry.run("half_minute", None, theta, None, MethodConfig(), KEY,
                       checkpoint_dir=tmp_path / "progress")
    assert out.minutes == pytest.approx(2.0)
    fresh = registry.run("half_minute", None, theta, None, MethodConfig(), KEY,
                         checkpoint_dir=tmp_path / "other")
    assert fresh.minutes == pytest.approx(0.5)


def test_repeated_stops_in_one_epoch_and_at_its_end(tmp_path, straight):
    # Stop after step 2 of epoch 1, then after step 6 of epoch 1, then at the end of epoch 2
    # (a signal in an epoch's last chunk saves the ordinary epoch checkpoint).
    for signals in ({1: [signal.SIGTERM]}, {2: [signal.SIGTERM]}, {5: [signal.SIGTERM]}):
        with pytest.raises(SystemExit):
            _resume(tmp_path, runner=signalling(signals))
    step, meta = _latest_meta(tmp_path)
    assert step == 2 and meta["epoch"] == 2 and "step" not in meta
    _same(_resume(tmp_path), straight)


def test_second_signal_stops_at_once(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        one = loop.LoopConfig(epochs=1, batch_size=4, steps_per_call=2, progress=False)
        loop.run_epochs(fake_runner, STATE0, None, POOL, KEY, one, ckpt)
    with pytest.raises(KeyboardInterrupt):
        _resume(tmp_path, runner=signalling({1: [signal.SIGINT, signal.SIGINT]}))
    step, meta = _latest_meta(tmp_path)
    assert step == 1 and "step" not in meta  # nothing saved by the stopped chunk


def test_nan_after_a_signal_checkpoint_keeps_it(tmp_path, straight):
    with pytest.raises(SystemExit):
        _resume(tmp_path, runner=signalling({6: [signal.SIGTERM]}))

    def nan_runner(state, consts, batches, keys, n_valid=None):
        state, metrics = fake_runner(state, consts, batches, keys, n_valid)
        return state, {**metrics, "loss": metrics["loss"] * jnp.nan}

    with pytest.raises(loop.NonFiniteLossError, match="at step 11"):
        _resume(tmp_path, runner=nan_runner)
    step, meta = _latest_meta(tmp_path)
    assert (step, meta["epoch"], meta["step"]) == (2, 1, 4)
    _same(_resume(tmp_path), straight)


def test_handlers_only_while_checkpointing_in_the_main_thread(tmp_path):
    seen = []

    def spy(state, consts, batches, keys, n_valid=None):
        seen.append(signal.getsignal(signal.SIGTERM))
        return fake_runner(state, consts, batches, keys, n_valid)

    before = signal.getsignal(signal.SIGTERM)
    one = loop.LoopConfig(epochs=1, batch_size=4, steps_per_call=7, progress=False)
    loop.run_epochs(spy, STATE0, None, POOL, KEY, one)  # no checkpointer: nothing installed
    _resume(tmp_path / "main", one, spy)
    errors = []

    def in_thread():
        try:
            _resume(tmp_path / "thread", one, spy)
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert not errors
    assert seen[0] is before and seen[1] is not before and seen[2] is before
    assert signal.getsignal(signal.SIGTERM) is before


def test_leftover_orbax_tmp_directories_do_not_break_resume(tmp_path, straight):
    two = loop.LoopConfig(epochs=2, batch_size=4, steps_per_call=2, progress=False)
    _resume(tmp_path, two)
    # What a kill during the save of step 3 leaves (both naming schemes orbax uses).
    for name in ("3.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000"):
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "state" / "half_written").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2  # a partial checkpoint is never listed
    _same(_resume(tmp_path), straight)
    assert _latest_meta(tmp_path)[0] == 3
    assert not (tmp_path / "3.orbax-checkpoint-tmp").exists()  # reused by the save of 3


def test_a_delete_cut_short_by_a_kill_leaves_the_previous_step(tmp_path, straight):
    """Checkpointer.delete renames a step out of orbax's listing before removing it, so a
    kill during the removal never leaves a half-deleted step listed as the latest."""
    two = loop.LoopConfig(epochs=2, batch_size=4, steps_per_call=2, progress=False)
    _resume(tmp_path, two)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        ckpt.delete(2)
        assert ckpt.latest_step() == 1 and not (tmp_path / "2").exists()
    _resume(tmp_path, two)  # saves step 2 again
    # What a kill during delete(2) leaves: the step renamed away and half removed.
    doomed = tmp_path / ".deleting-2.999"
    (tmp_path / "2").rename(doomed)
    files = [f for f in sorted(doomed.rglob("*")) if f.is_file()]
    for f in files[::2]:
        f.unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
    assert not doomed.exists()  # cleared when the folder is opened
    _same(_resume(tmp_path), straight)


def test_mid_epoch_checkpoint_refuses_another_geometry(tmp_path):
    with pytest.raises(SystemExit):
        _resume(tmp_path, runner=signalling({2: [signal.SIGTERM]}))
    other = loop.LoopConfig(epochs=3, batch_size=5, steps_per_call=2, progress=False)
    with pytest.raises(ValueError, match=r"step 4 of epoch 1 .*\(7, 30\).*\(6, 30\)"):
        _resume(tmp_path, other)


def test_epoch_checkpoint_refuses_another_geometry_or_fewer_epochs(tmp_path):
    _resume(tmp_path)  # a finished 3-epoch run
    other = loop.LoopConfig(epochs=3, batch_size=5, steps_per_call=2, progress=False)
    with pytest.raises(ValueError, match=r"saved after epoch 3 .*\(7, 30\).*\(6, 30\)"):
        _resume(tmp_path, other)
    fewer = loop.LoopConfig(epochs=1, batch_size=4, steps_per_call=2, progress=False)
    with pytest.raises(ValueError, match="after epoch 3, beyond epochs=1"):
        _resume(tmp_path, fewer)


def test_non_finite_state_with_a_finite_loss_is_never_saved(tmp_path):
    """An update that overflows while the loss is still finite stops the run at the end of
    the epoch, before the bad state could become the last checkpoint."""
    float_state = {"w": jnp.ones(3, jnp.float32)}

    def overflowing(state, consts, batches, keys, n_valid=None):
        steps = batches.shape[0] if n_valid is None else n_valid
        return {"w": state["w"] * jnp.inf}, {"loss": jnp.ones(steps)}

    with Checkpointer(tmp_path) as ckpt, pytest.raises(loop.NonFiniteLossError,
                                                       match="after epoch 1"):
        loop.run_epochs(overflowing, float_state, None, POOL, KEY, CFG, ckpt)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None


def test_checkpoint_of_another_state_is_a_clear_error(tmp_path):
    _resume(tmp_path, loop.LoopConfig(epochs=1, batch_size=4, progress=False))
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="does not fit"):
        loop.run_epochs(fake_runner, {"acc": jnp.zeros(2, jnp.int32)}, None, POOL, KEY, CFG,
                        ckpt)


@pytest.mark.parametrize("field, value", [("epochs", -1), ("batch_size", 0),
                                          ("steps_per_call", 0), ("steps_per_call", 1.5)])
def test_loop_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an int >= .*got {value}"):
        loop.LoopConfig(**{"epochs": 1, field: value})


# ------------------------------------------------------------------------------------------
# Curve training (real model): a SIGINT in the middle of an epoch resumes exactly
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def theta_p(theta_o):
    leaves, treedef = jax.tree.flatten(theta_o["params"])
    keys = jax.random.split(jax.random.PRNGKey(11), len(leaves))
    params = jax.tree.unflatten(treedef, [
        p + 0.3 * (jnp.std(p) + 1e-3) * jax.random.normal(k, p.shape)
        for p, k in zip(leaves, keys, strict=True)
    ])
    return {"params": params, "batch_stats": theta_o["batch_stats"]}


def _curve(model, theta_o, theta_p, images, split, key, epochs=1, **kw):
    config = MCUConfig(epochs=epochs, progress=False, steps_per_call=2)
    return mcu.train_curve(model, theta_o, theta_p, images, split.retain_subset, split.forget,
                           {"train": 99.0, "val": 95.0}, config, key, **kw)


@pytest.fixture(scope="module")
def curves_by_key(theta_o, theta_p, digits_images, digits_split, small_model):
    """One epoch of curve training with keys 0, 0 and 1."""
    train_images, _ = digits_images
    return [_curve(small_model, theta_o, theta_p, train_images, digits_split,
                   jax.random.PRNGKey(k)) for k in (0, 0, 1)]


def test_curve_training_interrupted_mid_epoch_resumes_exactly(
        tmp_path, monkeypatch, curves_by_key, theta_o, theta_p, digits_images, digits_split,
        small_model):
    train_images, _ = digits_images
    args = (small_model, theta_o, theta_p, train_images, digits_split, jax.random.PRNGKey(0))
    make_runner = loop.make_runner
    monkeypatch.setattr(loop, "make_runner",
                        lambda step, **kw: signalling({2: [signal.SIGINT]},
                                                      make_runner(step, **kw)))
    with pytest.raises(KeyboardInterrupt):  # 6 steps per epoch in chunks of 2: stops after 4
        _curve(*args, checkpoint_dir=tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
    first_session = loop.earlier_seconds(tmp_path)
    monkeypatch.setattr(loop, "make_runner", make_runner)
    resumed = _curve(*args, checkpoint_dir=tmp_path)
    assert first_session > 0 and resumed.minutes * 60 >= first_session  # RTE of both sessions
    full = curves_by_key[0]
    for a, b in zip(jax.tree.leaves(full.theta_c), jax.tree.leaves(resumed.theta_c),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.history == full.history


# ------------------------------------------------------------------------------------------
# The command line killed by SIGTERM / SIGKILL, then rerun: identical final variables
# ------------------------------------------------------------------------------------------

TRAIN_ARGS = ["train.epochs=4", "train.steps_per_call=1", "train.progress=false"]


class _Run:
    """``mcu-jax train`` on digits in a subprocess (CPU), its output in ``<out>.log``."""

    def __init__(self, out):
        self.out, self.log_path = out, out.with_name(out.name + ".log")
        self.proc = None

    def start(self):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, "-m", "mcu_jax.cli", "train", "--out", str(self.out),
               *TRAIN_ARGS]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self) -> int:
        return self.proc.wait(timeout=300)

    def first_checkpoint_written(self) -> bool:
        assert self.proc.poll() is None, self.log()[-3000:]  # still running
        return (self.out / "progress" / "1").is_dir()  # orbax renames it once complete

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run, started at once so that it overlaps other work."""
    run = _Run(tmp_path_factory.mktemp("cli") / "reference").start()

    def result():
        assert run.wait() == 0, run.log()[-3000:]
        return checkpoint.load_model(run.out)

    yield run.out, result
    run.kill()


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, reference_run):
    """Two runs next to the reference one: one gets SIGTERM and one SIGKILL after its first
    epoch checkpoint; both are then run again to the end (concurrently, to save time)."""
    tmp = tmp_path_factory.mktemp("stopped")
    runs_ = {sig: _Run(tmp / sig.name).start() for sig in (signal.SIGTERM, signal.SIGKILL)}
    try:
        waiting, deadline = dict(runs_), time.monotonic() + 300
        while waiting:
            for sig, run in list(waiting.items()):
                if run.first_checkpoint_written():
                    run.proc.send_signal(sig)
                    del waiting[sig]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        codes = {sig: run.wait() for sig, run in runs_.items()}
        logs = {sig: run.log() for sig, run in runs_.items()}
        done = {sig: checkpoint.model_exists(run.out) for sig, run in runs_.items()}
        for run in runs_.values():
            run.start()
        for run in runs_.values():
            assert run.wait() == 0, run.log()[-3000:]
        yield {sig: (codes[sig], logs[sig], done[sig], checkpoint.load_model(run.out))
               for sig, run in runs_.items()}
    finally:
        for run in runs_.values():
            run.kill()


def _assert_same_model(a, b):
    (va, ma), (vb, mb) = a, b
    assert jax.tree.structure(va) == jax.tree.structure(vb)
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ma["history"] == mb["history"] and ma["refs"] == mb["refs"]


@pytest.mark.slow
def test_cli_train_sigterm_saves_then_rerun_equals_uninterrupted(stopped_runs, reference_run):
    code, log, finished, model = stopped_runs[signal.SIGTERM]
    assert code == 143 and not finished
    assert "SIGTERM received; saved the state after" in log
    _assert_same_model(model, reference_run[1]())


@pytest.mark.slow
def test_cli_train_sigkill_then_rerun_equals_uninterrupted(stopped_runs, reference_run):
    code, _, finished, model = stopped_runs[signal.SIGKILL]
    assert code == -signal.SIGKILL and not finished
    _assert_same_model(model, reference_run[1]())


# ------------------------------------------------------------------------------------------
# Clear errors through the command line (exit code 2, one line)
# ------------------------------------------------------------------------------------------


def _cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, words", [
    ("mask.k=1.5", ["mask.k=1.5: k must be a fraction in [0, 1], got 1.5"]),
    ("mask.k_r=-0.1", ["mask.k_r=-0.1: k_r must be a fraction in [0, 1], got -0.1"]),
    ("selection.bn_batch_size=0", ["selection.bn_batch_size=0", "int >= 1, got 0"]),
    ("selection.bn_group=0", ["selection.bn_group=0", "int >= 1, got 0"]),
    ("selection.strategy=fast", ["selection.strategy=fast", "vmap", "'fast'"]),
    ("selection.chunk_size=0", ["selection.chunk_size=0", "int >= 1, got 0"]),
    ("mask.batch_size=0", ["mask.batch_size=0", "int >= 1, got 0"]),
    ("mcu.bogus=1", ["unknown config field 'mcu.bogus'", "beta_mode"]),
    ("mcu.beta_mode=sometimes", ["beta_mode", "adaptive", "sometimes"]),
])
def test_cli_mcu_bad_config_is_one_line(capsys, reference_run, tmp_path, override, words):
    ref, result = reference_run
    result()
    code, err = _cli(capsys, ["mcu", "--theta-o", ref, "--theta-p", ref, "--out",
                              tmp_path / "m", override])
    assert code == 2 and err.count("\n") == 1 and err.startswith("mcu-jax mcu: error:")
    for word in words:
        assert word in err
    assert not (tmp_path / "m").exists()


def test_cli_unknown_method_lists_known_ones(capsys, reference_run, tmp_path):
    ref, result = reference_run
    result()
    code, err = _cli(capsys, ["unlearn", "--theta-o", ref, "--method", "nope", "--out",
                              tmp_path / "p"])
    assert code == 2 and err.count("\n") == 1
    assert "unknown unlearning method 'nope'" in err and "neggrad" in err and "salun" in err
    code, err = _cli(capsys, ["unlearn", "--theta-o", ref, "--method", "ga", "--out",
                              tmp_path / "p", "epochz=1"])
    assert code == 2 and err.count("\n") == 1 and "unknown config field 'epochz'" in err


@pytest.mark.parametrize("override, words", [
    ("problem.model=resnet1000", ["unknown model 'resnet1000'", "cnn_small", "resnet20"]),
    ("problem.dataset=mnist", ["'mnist'", "digits", "cifar10"]),
    ("problem.forget_ratio=1.5", ["forget_ratio=1.5"]),
    ("train.steps_per_call=0", ["steps_per_call"]),
    ("problem.bogus=1", ["unknown config field 'problem.bogus'", "forget_ratio"]),
])
def test_cli_train_bad_config_is_one_line(capsys, tmp_path, override, words):
    code, err = _cli(capsys, ["train", "--out", tmp_path / "o", override])
    assert code == 2 and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_truncated_cifar10_npz_says_how_to_get_the_data(tmp_path):
    path = tmp_path / "cifar10_jpeg.npz"
    np.savez(path, jpeg=np.arange(4000, dtype=np.uint8), offsets=np.arange(5),
             labels=np.zeros(4, np.uint8), is_test=np.zeros(4, bool))
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message
    assert "shared/data" in message or "cifar-10-python.tar.gz" in message


# ------------------------------------------------------------------------------------------
# Run folders
# ------------------------------------------------------------------------------------------

CONFIG = {"problem": {"dataset": "digits", "seed": 0}, "mcu": {"epochs": 5, "progress": True},
          "methods": ["ga", "ft"], "progress": False}


def test_run_folder_records_config_and_environment(tmp_path):
    run = runs.RunDir(tmp_path / "r")
    run.open(CONFIG)
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["config"] == CONFIG
    import mcu_jax

    assert record["mcu_jax_version"] == mcu_jax.__version__
    assert record["jax_version"] == jax.__version__
    assert record["backend"] == jax.default_backend()
    assert record["device_kind"] == jax.devices()[0].device_kind
    assert run.path("theta_o", "x") == tmp_path / "r" / "theta_o" / "x"


def test_run_folder_reopens_compatible_and_refuses_other_configs(tmp_path):
    run = runs.RunDir(tmp_path)
    run.open(CONFIG)
    # Same config up to "progress" at any depth; tuples read back as lists.
    run.open({**CONFIG, "progress": True, "mcu": {"epochs": 5, "progress": False},
              "methods": ("ga", "ft")})
    changed = {**CONFIG, "problem": {"dataset": "digits", "seed": 1}}
    with pytest.raises(ValueError, match=r"problem\.seed is 0 there but 1 now.*new folder"):
        run.open(changed)
    with pytest.raises(ValueError, match=r"methods\[1\] is 'ft' there but 'rl' now"):
        run.open({**CONFIG, "methods": ["ga", "rl"]})
    with pytest.raises(ValueError, match=r"extra is '<missing>' there but 3 now"):
        run.open({**CONFIG, "extra": 3})
    with pytest.raises(ValueError, match=r"mcu\.epochs is 5 there but True now"):
        run.open({**CONFIG, "mcu": {"epochs": True, "progress": True}})
    with pytest.raises(ValueError, match="mcu.progress"):
        run.open({**CONFIG, "mcu": {"epochs": 5, "progress": False}}, ignore=())
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a run record"):
        run.open(CONFIG)


def test_run_folder_default_ignores_speed_settings_at_any_depth(tmp_path):
    """An experiment folder (RunDir.open's default) accepts other speed settings
    (steps_per_call, checkpoint_every, progress), another data folder and another rerun
    command, as train_model's and run_mcu's folders do; nothing else."""
    run = runs.RunDir(tmp_path)
    base = {"original": {"epochs": 3, "steps_per_call": 50, "checkpoint_every": 1},
            "problem": {"data_dir": "/a"}, "command": "python experiments/run.py x"}
    run.open(base)
    run.open({"original": {"epochs": 3, "steps_per_call": 10, "checkpoint_every": 2},
              "problem": {"data_dir": "/b"}, "command": ""})
    with pytest.raises(ValueError, match=r"original\.epochs"):
        run.open({**base, "original": {**base["original"], "epochs": 4}})


def test_digests_and_model_identity():
    """tree_digest sees which leaf holds which array (swapped leaves, or the same arrays
    under other names, differ); the model identity leaves out fold_bn (the same function,
    evaluated faster) and fields added later at their old value (fused_bn=False; checked in
    test_models.py), and nothing else."""
    from mcu_jax.models import create, folded

    x, y = np.zeros(3, np.float32), np.ones(3, np.float32)
    assert runs.tree_digest({"a": x, "b": y}) != runs.tree_digest({"a": y, "b": x})
    assert runs.tree_digest({"a": x, "b": y}) != runs.tree_digest({"c": x, "d": y})
    assert runs.tree_digest({"a": x, "b": y}) == runs.tree_digest({"a": x.copy(), "b": y})
    model = create("resnet20", 10)
    assert runs.model_identity(folded(model)) == runs.model_identity(model)
    assert runs.model_identity(create("resnet20", 100)) != runs.model_identity(model)


def test_a_model_is_there_only_when_both_parts_are(tmp_path):
    """model_exists needs the variables and metadata.json (written last): a kill between the
    two writes, or a folder with the metadata only, is not a model."""
    checkpoint.save_model(tmp_path / "m", {"params": {"w": np.ones(2, np.float32)}}, {"a": 1})
    assert checkpoint.model_exists(tmp_path / "m")
    (tmp_path / "m" / "metadata.json").rename(tmp_path / "meta.json")
    assert not checkpoint.model_exists(tmp_path / "m")  # variables only
    (tmp_path / "only_meta").mkdir()
    (tmp_path / "meta.json").rename(tmp_path / "only_meta" / "metadata.json")
    assert not checkpoint.model_exists(tmp_path / "only_meta")


def test_write_json_renames_a_temporary_file_of_the_same_folder(monkeypatch, tmp_path):
    """The atomic write's temporary file lives beside the target (a rename across file
    systems would not be atomic) and is gone afterwards."""
    from pathlib import Path

    renames, replace = [], Path.replace

    def spy(self, target):
        renames.append((Path(self), Path(target)))
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    checkpoint.write_json(tmp_path / "sub" / "x.json", {"a": 1})
    [(source, target)] = renames
    assert source.parent == target.parent == tmp_path / "sub" and source != target
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.json"]
    assert json.loads(target.read_text()) == {"a": 1}


def test_a_field_added_later_at_its_old_behaviour_keeps_old_folders(tmp_path):
    """A folder recorded before MCUConfig had ``curve`` answers the paper's Bezier curve (the
    behaviour then), not another curve; a real run record made today round-trips."""
    run = runs.RunDir(tmp_path / "old")
    run.open(CONFIG)  # no "curve" anywhere: an older library's record
    run.open({**CONFIG, "mcu": {**CONFIG["mcu"], "curve": "bezier"}})
    with pytest.raises(ValueError, match=r"mcu\.curve is '<missing>' there but 'polychain'"):
        run.open({**CONFIG, "mcu": {**CONFIG["mcu"], "curve": "polychain"}})
    today = {"mcu": dataclasses.asdict(MCUConfig())}
    runs.RunDir(tmp_path / "new").open(today)
    runs.RunDir(tmp_path / "new").open(today)
    with pytest.raises(ValueError, match=r"mcu\.curve is 'bezier' there but 'polychain'"):
        runs.RunDir(tmp_path / "new").open(
            {"mcu": dataclasses.asdict(MCUConfig(curve="polychain"))})


def test_folders_of_older_versions_answer_the_fields_added_since(tmp_path):
    """An ablation folder made before the random mask, the data subsets, models_from,
    fused_bn, the sweep's speed settings and curve training's ``combine`` existed is still
    its own request today (those fields at their old behaviour), and refuses the new
    behaviours."""
    from mcu_jax import config
    from mcu_jax.ablation import AblationConfig
    from mcu_jax.experiment import ExperimentConfig

    def without(tree, names):
        if isinstance(tree, dict):
            return {k: without(v, names) for k, v in tree.items() if k not in names}
        return tree

    today = config.to_dict(AblationConfig(
        experiment=ExperimentConfig(models_from="digits_random"), kind="k", values=(0.1,)))
    old = without(today, {"train_size", "test_size", "models_from", "seed", "fused_bn",
                          "fold_bn", "bn_group", "pointwise", "conv3x3", "combine"})
    old["experiment"]["mask"].pop("kind")
    old["experiment"]["problem"]["seed"] = 0  # the problem's seed is no new field
    run = runs.RunDir(tmp_path / "abl")
    run.open(old)
    run.open(today)
    for field, value in (("train_size", 500), ("fused_bn", True), ("kind", "random")):
        group = "mask" if field == "kind" else "problem"
        changed = config.to_dict(AblationConfig(
            experiment=ExperimentConfig(**{group: type(getattr(ExperimentConfig(), group))(
                **{field: value})}), kind="k", values=(0.1,)))
        with pytest.raises(runs.RequestMismatch, match=f"{group}.{field} is '<missing>'"):
            run.open(changed)


def test_run_folder_phases(tmp_path):
    run = runs.RunDir(tmp_path)
    run.open(CONFIG)
    assert not run.phase_done("theta_o")
    with pytest.raises(FileNotFoundError, match="theta_o.*not done"):
        run.load_phase("theta_o")
    run.mark_done("theta_o", {"refs": {"train": 99.5}, "ts": np.arange(3)})
    assert run.phase_done("theta_o")
    assert run.load_phase("theta_o") == {"refs": {"train": 99.5}, "ts": [0, 1, 2]}
    run.mark_done("theta_o", {"refs": {"train": 98.0}})  # replaced atomically
    assert run.load_phase("theta_o") == {"refs": {"train": 98.0}}
    assert sorted(p.name for p in (tmp_path / "phases").iterdir()) == ["theta_o.json"]
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ValueError, match="phase name"):
            run.phase_done(bad)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        run.mark_done("bad", {"f": object()})
    assert not run.phase_done("bad")  # a failed write leaves no marker ...
    assert sorted(p.name for p in (tmp_path / "phases").iterdir()) == ["theta_o.json"]


# ------------------------------------------------------------------------------------------
# Determinism per seed (CPU)
# ------------------------------------------------------------------------------------------


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _equal(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_same_seed_same_split(digits):
    fields = ("forget", "retain", "retain_subset", "val", "test", "test_forget", "test_retain")
    for scenario in ("random", "class"):
        a, b, c = (make_split(digits, scenario, seed=s) for s in (4, 4, 5))
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)
        assert a.forget_class == b.forget_class
        assert not all(np.array_equal(getattr(a, f), getattr(c, f)) for f in fields)


def test_same_seed_same_mask(digits, digits_images, small_model, theta_o):
    train_images, _ = digits_images

    def mask_for(seed):
        split = make_split(digits, "random", seed=seed)
        grads = masks.mask_gradients(small_model, theta_o, train_images, split.retain,
                                     split.forget)
        return grads, masks.parameter_mask(*grads, k=0.3, k_r=0.1)

    (g0, m0), (g1, m1), (g2, _) = mask_for(0), mask_for(0), mask_for(1)
    assert _equal(g0, g1) and jax.tree.leaves(m0) == jax.tree.leaves(m1)
    assert not _equal(g0[1], g2[1])  # another forget set, another forget gradient


def test_same_key_same_curve(curves_by_key):
    a, b, c = curves_by_key
    assert _equal(a.theta_c, b.theta_c) and a.history == b.history
    assert not _equal(a.theta_c, c.theta_c)


def test_same_curve_same_sweep(curves_by_key, theta_o, theta_p, digits_images, digits_split,
                               small_model):
    train_images, test_images = digits_images
    sets = {"retain": (train_images, digits_split.retain[:200]),
            "forget": (train_images, digits_split.forget),
            "test": (test_images, digits_split.test)}

    def run(curve):
        points = [theta_o["params"], curve.theta_c, theta_p["params"]]
        return sweep.sweep(small_model, points, [0.2, 0.5, 0.9], theta_o["batch_stats"],
                           (train_images, digits_split.retain[:300]), sets, return_probs=True)

    a, b, c = (run(curve) for curve in curves_by_key)
    for name in sets:
        np.testing.assert_array_equal(a.acc[name], b.acc[name])
        np.testing.assert_array_equal(a.probs[name], b.probs[name])
    assert any(not np.array_equal(a.probs[n], c.probs[n]) for n in sets)


def test_out_of_range_indices_and_bad_batch_sizes_are_named(digits_images, digits_split,
                                                            small_model, theta_o):
    from mcu_jax import bn, evaluation, mcu, sweep, train

    train_images, _ = digits_images
    n = train_images.num_examples
    with pytest.raises(ValueError, match=r"indices outside \[0, "):
        evaluation.accuracy(small_model, theta_o, train_images, [0, n + 3])
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluation.accuracy(small_model, theta_o, train_images, [0, 1], batch_size=0)
    with pytest.raises(ValueError, match=r"indices outside"):
        bn.recompute(small_model, theta_o, train_images, [-1, 2])
    with pytest.raises(ValueError, match="eval_batch_size=0"):
        sweep.sweep(small_model, [theta_o["params"]] * 3, [0.5], theta_o["batch_stats"],
                    (train_images, [0, 1]), {"r": (train_images, [0])}, eval_batch_size=0)
    with pytest.raises(ValueError, match="training index set"):
        train.fit(small_model, theta_o, train_images, [n], train.TrainConfig(epochs=1),
                  jax.random.PRNGKey(0))
    refs = {"train": 100.0, "val": 90.0}
    config = mcu.MCUConfig(epochs=1, progress=False)
    with pytest.raises(ValueError, match="share"):
        mcu.train_curve(small_model, theta_o, theta_o, train_images, digits_split.forget[:5],
                        digits_split.forget, refs, config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="refs lacks"):
        mcu.train_curve(small_model, theta_o, theta_o, train_images, digits_split.retain_subset,
                        digits_split.forget, {"train": 100.0}, config, jax.random.PRNGKey(0))


def test_config_values_out_of_range_are_rejected():
    from mcu_jax import mcu, train

    with pytest.raises(ValueError, match="momentum"):
        train.TrainConfig(momentum=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        train.TrainConfig(weight_decay=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        mcu.MCUConfig(momentum=1.0)
    with pytest.raises(ValueError, match="beta_init"):
        mcu.MCUConfig(beta_init=float("nan"))
    with pytest.raises(ValueError, match="lr must be a positive finite number, got nan"):
        mcu.MCUConfig(lr=float("nan"))
    for name in ("steps_per_call", "checkpoint_every"):  # named up front, not in the loop
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
            mcu.MCUConfig(**{name: 0})
    with pytest.raises(ValueError, match="epochs must be an int >= 0, got 2.5"):
        mcu.MCUConfig(epochs=2.5)
    with pytest.raises(ValueError, match="k must be a fraction in \\[0, 1\\], got '0.3'"):
        pipeline.MaskConfig(k="0.3")
    for bad in ("0.5", True):
        with pytest.raises(ValueError, match="k must be a fraction"):
            masks.parameter_mask({"w": np.ones(2)}, {"w": np.ones(2)}, k=bad)
    with pytest.raises(ValueError, match="eval_batch_size must be an int >= 1, got 0"):
        pipeline.SelectionConfig(eval_batch_size=0)
    with pytest.raises(ValueError, match="3"):
        mcu.adaptive_beta(90.0, 99.0, 100.0, 90.0, values=(0.0, 0.5))


def test_an_added_field_is_matched_by_its_path_not_its_name_alone(tmp_path):
    """``mask.seed`` is an added field; a record lacking some other ``seed`` (a data seed,
    say) is another request, and the added field is recognised at any depth (an ablation
    nests the experiment's mask)."""
    run = runs.RunDir(tmp_path / "r")
    run.open({"experiment": {"mask": {"k": 0.5}, "problem": {"name": "digits"}}})
    run.open({"experiment": {"mask": {"k": 0.5, "seed": 0},
                             "problem": {"name": "digits", "train_size": None}}})
    with pytest.raises(runs.RequestMismatch, match=r"experiment\.problem\.seed is '<missing>'"):
        run.open({"experiment": {"mask": {"k": 0.5}, "problem": {"name": "digits", "seed": 0}}})
    with pytest.raises(runs.RequestMismatch, match=r"experiment\.mask\.seed is '<missing>'"):
        run.open({"experiment": {"mask": {"k": 0.5, "seed": 3}, "problem": {"name": "digits"}}})
    # SalUn's saliency_augment in a method folder's record, likewise
    assert runs.first_difference({"config": {"fraction": 0.5}},
                                 {"config": {"fraction": 0.5, "saliency_augment": False}}) is None
    assert runs.first_difference({"config": {"fraction": 0.5}},
                                 {"config": {"fraction": 0.5, "saliency_augment": True}})
    # mask.augment (added later): False is the old behaviour, True another request
    run.open({"experiment": {"mask": {"k": 0.5, "augment": False},
                             "problem": {"name": "digits"}}})
    with pytest.raises(runs.RequestMismatch, match=r"experiment\.mask\.augment is '<missing>'"):
        run.open({"experiment": {"mask": {"k": 0.5, "augment": True},
                                 "problem": {"name": "digits"}}})


_HOLDER = """
import sys, time
from pathlib import Path
from mcu_jax import runs
folder = Path(sys.argv[1])
with runs.exclusive(folder):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    (folder / "made").write_text("by the first process")
"""


def _start_holder(folder, seconds):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_waits_for_the_folder_and_finds_the_work_done(tmp_path, capsys):
    """Two processes making the same model: the second enters the folder only after the
    first has left it (so it finds the model made), and says that it waits."""
    folder = tmp_path / "theta_o"
    proc = _start_holder(folder, 2.0)
    try:
        with runs.exclusive(folder):
            assert (folder / "made").read_text() == "by the first process"
    finally:
        proc.wait(timeout=60)
    assert "another process is making this model; waiting" in capsys.readouterr().err


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "m"
    proc = _start_holder(folder, 600.0)
    proc.kill()
    proc.wait(timeout=60)
    start = time.perf_counter()
    with runs.exclusive(folder):
        assert not (folder / "made").exists()
    assert time.perf_counter() - start < 5.0


def test_nested_holds_of_one_folder_in_one_process_pass_through(tmp_path):
    with runs.exclusive(tmp_path / "f"), runs.exclusive(tmp_path / "f" / "." ):
        pass
    with runs.exclusive(tmp_path / "f"):  # released: can be taken again
        pass


def test_model_making_functions_hold_their_out_dir(tmp_path, monkeypatch):
    """train_model, methods.produce and run_mcu each hold their out_dir (and nothing when
    out_dir is None)."""
    import inspect

    from mcu_jax import methods, train

    held, stop = [], []

    class Recorder:
        def __init__(self, folder):
            held.append(str(folder))

        def __enter__(self):
            if stop:
                raise KeyboardInterrupt  # before the function does any work
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runs, "exclusive", Recorder)

    @runs.holds_folder("out_dir")
    def make(x, out_dir=None):
        return x

    assert make(1) == 1 and held == []
    assert make(2, out_dir=tmp_path / "a") == 2 and held == [str(tmp_path / "a")]
    assert make(3, tmp_path / "b") == 3 and held[-1] == str(tmp_path / "b")
    stop.append(True)
    for fn in (train.train_model, methods.produce, pipeline.run_mcu):
        required = [p.name for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty and p.name != "out_dir"]
        with pytest.raises(KeyboardInterrupt):
            fn(**dict.fromkeys(required), out_dir=tmp_path / fn.__name__)
        assert held[-1] == str(tmp_path / fn.__name__)


def test_a_read_only_folder_is_entered_unlocked(tmp_path, monkeypatch):
    """A folder where no lock file can be written (read-only: its models can only be loaded)
    is entered without a lock instead of failing."""
    from pathlib import Path

    folder = tmp_path / "models"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == folder.resolve():
            raise OSError(30, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with runs.exclusive(folder):
        pass
    assert not (folder / ".lock").exists()


def test_two_threads_do_not_share_a_folder(tmp_path):
    """Threads of one process are kept apart as processes are (each takes its own lock)."""
    folder, inside, overlaps = tmp_path / "m", [], []

    def work():
        with runs.exclusive(folder):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.3)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert overlaps == [1, 1]


def test_the_processes_of_one_multi_process_run_take_no_lock(tmp_path, monkeypatch):
    """Several JAX processes make one model together (collectives, barriers): a lock would
    leave one waiting for another that waits for it, so they take none."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with runs.exclusive(tmp_path / "m"), runs.exclusive(tmp_path / "m"):
        pass
    assert not (tmp_path / "m").exists()


def test_a_folder_that_cannot_be_written_for_another_reason_is_an_error(tmp_path, monkeypatch):
    from pathlib import Path

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(OSError, match="No space left"):
        with runs.exclusive(tmp_path / "m"):
            pass

