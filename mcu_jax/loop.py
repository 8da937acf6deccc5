"""The epoch loop shared by ordinary training and curve training.

A loop state (any pytree) is advanced by a per-batch ``step(state, consts, idx, key)``.
On accelerators several steps run inside one compiled call (``lax.scan``), which cuts
kernel-launch and host overhead; the host only looks at the per-step metrics after each
call, to update the progress bar and to stop on a non-finite loss. Every call of an epoch
has the same length (the last one padded with steps whose results are discarded), so a
whole run compiles one program: on a GPU a second program for a shorter last call would
cost as much compilation as the first (tens of seconds for PreResNet-110). Every
``checkpoint_every`` epochs (default 1) and after the last one the state is checkpointed,
with the wall-clock seconds trained so far (:func:`earlier_seconds`), so a killed run
resumes at the last saved epoch and, with per-epoch keys derived by ``fold_in``, ends with
exactly the same result as an uninterrupted one. A non-finite loss, or a non-finite state about
to be checkpointed, stops the run before anything bad is saved.

SIGINT and SIGTERM do not kill a checkpointed loop at once: they set a flag, and at the next
boundary between step chunks the loop saves the current state (mid-epoch if need be, with
the epoch, the step within it and that epoch's metrics so far in the metadata) and then
raises ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(143)`` (SIGTERM). A resumed run
rebuilds that epoch's batches and keys from ``fold_in(key, epoch)`` and continues at the
saved step, so it ends exactly as an uninterrupted run would. A second signal stops at once.

With a ``mesh`` (``mcu_jax.sharding``) the loop is data parallel: state and constants are
replicated on the mesh's devices, every step's index batch is split along its batch axis,
and the compiled step keeps the state replicated (its outputs are pinned to that sharding,
so the donated buffers are reused). ``mesh=None`` is the single-device loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mcu_jax import sharding
from mcu_jax.checkpoint import Checkpointer
from mcu_jax.data.batching import epoch_batches

Step = Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, dict]]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int = 128
    steps_per_call: int = 50
    drop_remainder: bool = True
    progress: bool = True
    desc: str = "train"
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)

    def __post_init__(self):
        for name, low in (("epochs", 0), ("batch_size", 1), ("steps_per_call", 1),
                          ("checkpoint_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.desc}: {name} must be an int >= {low}, got {value!r}")


def make_runner(step: Step, unrolled: bool | None = None, mesh=None) -> Callable:
    """Compiles ``step`` into ``run(state, consts, batches, keys, n_valid=None) ->
    (state, metrics)`` over the ``(steps, B)`` index ``batches`` and ``(steps, ...)`` keys.

    Only the first ``n_valid`` steps (default: all) advance the state; the rest are padding
    whose results are discarded (their metrics are still returned: slice them off). The
    number is traced, not static, so calls of any ``n_valid`` share one compiled program.

    On accelerators the steps of one call run inside a single ``lax.scan`` (one launch per
    call, state donated). XLA's CPU backend runs convolution gradients inside a while loop
    tens of times slower than in straight-line code, so on CPU (``unrolled``, the default
    there) each step is its own donated jitted call and the host loops over the valid ones.

    With a ``mesh`` (a ``jax.sharding.Mesh``) both forms are data parallel: the runner lays
    out state, consts and keys replicated and the ``(steps, B)`` batches split along B (a
    no-op for inputs already laid out so), and the compiled step, traced under the mesh
    (``sharding.data_parallel``), returns the state and the metrics replicated.
    """
    if unrolled is None:
        unrolled = jax.default_backend() == "cpu"
    if mesh is None:
        place = None
        program = jax.jit
    else:
        rep = sharding.replicated(mesh)
        one_batch = sharding.batch_sharding(mesh, ndim=1)
        call_batches = sharding.batch_sharding(mesh, ndim=2)
        program = functools.partial(sharding.data_parallel, mesh=mesh)

        def place(state, consts, keys):
            return (sharding.place(state, rep), sharding.place(consts, rep),
                    sharding.place(keys, rep))

    if unrolled:
        one = program(step, donate_argnums=(0,))

        def run_steps(state, consts, batches, keys, n_valid=None):
            if place is not None:
                state, consts, keys = place(state, consts, keys)
            metrics = []
            for i in range(_valid_steps(batches, n_valid)):
                idx = batches[i] if place is None else sharding.place(batches[i], one_batch)
                state, m = one(state, consts, idx, keys[i])
                metrics.append(m)
            return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

        return run_steps

    def run(state, consts, batches, keys, n_valid):
        def body(carry, xs):
            idx, key, i = xs
            new, metrics = step(carry, consts, idx, key)
            keep = i < n_valid  # a padding step leaves the state as it was
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry), metrics

        return jax.lax.scan(body, state, (batches, keys, jnp.arange(batches.shape[0])))

    scanned = program(run, donate_argnums=(0,))

    def run_scanned(state, consts, batches, keys, n_valid=None):
        n_valid = _valid_steps(batches, n_valid)
        if place is None:
            return scanned(state, consts, batches, keys, n_valid)
        state, consts, keys = place(state, consts, keys)
        return scanned(state, consts, sharding.place(batches, call_batches), keys, n_valid)

    return run_scanned


def _valid_steps(batches, n_valid) -> int:
    steps = int(batches.shape[0])
    if n_valid is None:
        return steps
    n_valid = int(n_valid)
    if not 1 <= n_valid <= steps:
        raise ValueError(f"n_valid must be in [1, {steps}] (the call's steps), got {n_valid}")
    return n_valid


def call_length(steps_per_epoch: int, steps_per_call: int) -> int:
    """Steps per compiled call: at most ``steps_per_call``, chosen so that the calls of an
    epoch are as even as possible (the padding of the last call is below one step per call):
    e.g. 214 steps at up to 50 per call -> 5 calls of 43 (one padding step)."""
    calls = math.ceil(steps_per_epoch / steps_per_call)
    return math.ceil(steps_per_epoch / calls)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """``x`` with its last row repeated up to ``rows`` rows."""
    missing = rows - x.shape[0]
    if missing <= 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], missing, axis=0)])


#: What a NonFiniteLossError leaves and how to go on.
_KEPT = ("The last good checkpoint (previous epoch or signal stop) is kept. A run folder "
         "refuses other settings: rerun in a new one (e.g. with a smaller learning rate).")


def _check_finite(metrics: dict, first_step: int, desc: str, checkpointed: bool) -> None:
    loss = np.asarray(metrics["loss"])
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        step = first_step + int(bad[0])
        then = _KEPT if checkpointed else ("No checkpoint folder was given, so nothing is "
                                           "kept: rerun, e.g. with a smaller learning rate.")
        raise NonFiniteLossError(
            f"{desc}: loss became {loss[bad[0]]} at step {step}; stopping. {then}")


def _check_finite_state(state: Any, meta: dict, desc: str) -> None:
    """NonFiniteLossError when a floating leaf of ``state`` holds a NaN or infinity (a
    finite loss can still come with an update that overflows): such a state is never
    saved, so the last good checkpoint stays the last one."""
    leaves = [x for x in jax.tree.leaves(state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if leaves and not bool(_all_finite(leaves)):
        where = (f"at step {meta['step']} of epoch {meta['epoch'] + 1}" if meta.get("step")
                 else f"after epoch {meta['epoch']}")
        raise NonFiniteLossError(
            f"{desc}: the state {where} holds non-finite values; stopping. {_KEPT}")


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_exception(signum: int, note: str = "") -> BaseException:
    """What a signal ends the run with: KeyboardInterrupt (SIGINT) or SystemExit(143)."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt(note) if note else KeyboardInterrupt()
    return SystemExit(128 + int(signum))


class _SignalFlag:
    """While active, SIGINT/SIGTERM only record themselves (main thread only: Python lets
    no other thread install handlers); a second signal stops at once. The previous handlers
    come back on exit."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        if self.received is not None:
            raise _stop_exception(signum)
        self.received = signum

    def agreed(self) -> int | None:
        """The signal to stop for at this boundary between chunks. In a multi-process run
        every process must stop at the same boundary (one that went on would wait forever
        for the others in its next step's collectives), so there it is any process's signal,
        agreed by an all-gather that every process makes at every boundary."""
        if not self.enabled or jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.int32(self.received or 0))
        return int(np.max(got)) or None

    def __enter__(self) -> _SignalFlag:
        if self.enabled:
            for sig in _SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python; the default is the best we can do.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def _save(checkpointer: Checkpointer, step_id: int, state: Any, meta: dict, desc: str) -> None:
    """Saves under ``step_id``, replacing a signal-stop checkpoint of the same id; a state
    with non-finite values is refused (:func:`_check_finite_state`) before anything is
    deleted."""
    _check_finite_state(state, meta, desc)
    checkpointer.delete(step_id)  # orbax refuses to overwrite a step
    checkpointer.save(step_id, state, meta)


def _pack_metrics(chunks: list[dict]) -> dict:
    """The stacked per-step metrics of a partial epoch as exact JSON (dtype, shape, values)."""
    if not chunks:
        return {}
    out = {}
    for k in chunks[0]:
        a = np.concatenate([np.asarray(c[k]) for c in chunks])
        out[k] = {"dtype": a.dtype.str, "shape": list(a.shape), "values": a.ravel().tolist()}
    return out


def _unpack_metrics(packed: dict) -> list[dict]:
    if not packed:
        return []
    return [{
        k: np.asarray(v["values"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])
        for k, v in packed.items()
    }]


def run_epochs(
    runner: Callable,
    state: Any,
    consts: Any,
    pool: jax.Array,
    key: jax.Array,
    config: LoopConfig,
    checkpointer: Checkpointer | None = None,
    summarize: Callable[[dict], dict] | None = None,
    mesh=None,
) -> tuple[Any, list[dict]]:
    """Runs ``config.epochs`` epochs over the index ``pool``; resumes from ``checkpointer``.

    Returns the final state and a per-epoch history of the mean of every step metric (or
    whatever ``summarize`` makes of the stacked metrics of one epoch).

    With a ``checkpointer`` the state is saved after every epoch (checkpoint id = number of
    finished epochs), and SIGINT/SIGTERM received in the main thread save the state at the
    next chunk boundary (id = the running epoch + 1, metadata ``step`` > 0) before raising
    ``KeyboardInterrupt`` / ``SystemExit(143)``. Either kind of checkpoint is resumed exactly.
    Every checkpoint's metadata also holds ``seconds``: the wall-clock time this run has spent
    in this function up to that save, summed over the sessions that resumed it
    (:func:`earlier_seconds` reads it, so callers can report a resumed run's full time).

    With a ``mesh`` (pass the same one to :func:`make_runner`) state and consts are
    replicated on its devices once, here, and ``config.batch_size`` must be divisible by
    the number of devices.
    """
    session_start = time.perf_counter()
    sharding.check_batch_size(config.batch_size, mesh, f"{config.desc}: batch_size")
    pool = jnp.asarray(pool, jnp.int32)
    n = int(pool.shape[0])
    if n == 0:
        raise ValueError(f"{config.desc}: cannot train on an empty index set")
    # Sets smaller than one batch wrap around instead of giving no batch at all.
    drop = config.drop_remainder and n >= config.batch_size
    steps_per_epoch = n // config.batch_size if drop else math.ceil(n / config.batch_size)
    per_call = call_length(steps_per_epoch, config.steps_per_call)
    # Rows after the epoch's last step, so that a call starting at any step (a resume from a
    # checkpoint saved with another chunking included) has per_call rows.
    padded_steps = steps_per_epoch + per_call - 1
    # The runner donates its state: work on a copy so the caller's arrays stay valid.
    state = jax.tree.map(jnp.array, state)
    history: list[dict] = []
    start, start_step, partial = 0, 0, []
    before = 0.0  # seconds spent by the sessions before this one (from the checkpoint)
    if checkpointer is not None and checkpointer.latest_step() is not None:
        try:
            state, meta = checkpointer.restore(state)
        except ValueError as err:  # orbax: another structure, shape or dtype on disk
            lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
            orbax = " ".join(lines[:4]) if lines else repr(err)  # its first mismatch
            raise ValueError(
                f"{config.desc}: the checkpoint in {checkpointer.directory} does not fit this "
                "run's state (another model, optimiser or mask, or a state saved by another "
                f"version of mcu-jax?): {orbax}; use a new checkpoint folder, or delete "
                f"{checkpointer.directory} to start this training again"
            ) from err
        start = int(meta["epoch"])
        start_step = int(meta.get("step", 0))
        history = list(meta.get("history", []))
        before = float(meta.get("seconds", 0.0))
        saved = (meta.get("steps_per_epoch"), meta.get("pool_size"))
        if saved != (None, None) and saved != (steps_per_epoch, n):
            where = (f"stopped at step {start_step} of epoch {start + 1}" if start_step
                     else f"was saved after epoch {start}")
            raise ValueError(
                f"{config.desc}: the checkpoint in {checkpointer.directory} {where} with "
                f"(steps per epoch, pool size) = {saved}, but this run has "
                f"{(steps_per_epoch, n)}; resume with the same pool and batch size or use a "
                "new checkpoint folder"
            )
        if start > config.epochs or (start_step and start >= config.epochs):
            raise ValueError(
                f"{config.desc}: the checkpoint in {checkpointer.directory} is "
                f"{'inside' if start_step else 'after'} epoch {start + 1 if start_step else start}"
                f", beyond epochs={config.epochs}; use the same epochs or a new checkpoint "
                "folder"
            )
        if start_step:
            partial = _unpack_metrics(meta.get("partial", {}))
    if mesh is not None:  # once, so that the runner's own placement is a no-op
        state = sharding.replicate(state, mesh)
        consts = sharding.replicate(consts, mesh)
    summarize = summarize or (lambda m: {k: float(np.mean(v)) for k, v in m.items()})
    geometry = {"steps_per_epoch": steps_per_epoch, "pool_size": n}

    def seconds() -> float:
        return before + time.perf_counter() - session_start

    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=start * steps_per_epoch + start_step,
        desc=config.desc,
        disable=not config.progress,
        leave=False,
    )
    flag = _SignalFlag(enabled=checkpointer is not None)
    try:
        with flag:
            for epoch in range(start, config.epochs):
                ekey = jax.random.fold_in(key, epoch)
                batches = epoch_batches(
                    jax.random.fold_in(ekey, 0), pool, config.batch_size, drop
                )
                keys = jax.random.split(jax.random.fold_in(ekey, 1), steps_per_epoch)
                # Padded once per epoch, so every call below has per_call steps.
                batches = _pad_rows(batches, padded_steps)
                keys = _pad_rows(keys, padded_steps)
                first = start_step if epoch == start else 0
                chunks = partial if epoch == start else []
                for lo in range(first, steps_per_epoch, per_call):
                    hi = min(lo + per_call, steps_per_epoch)
                    state, metrics = runner(
                        state, consts, batches[lo : lo + per_call], keys[lo : lo + per_call],
                        hi - lo,
                    )
                    metrics = jax.tree.map(lambda m, k=hi - lo: np.asarray(m)[:k],
                                           jax.device_get(metrics))
                    _check_finite(metrics, epoch * steps_per_epoch + lo, config.desc,
                                  checkpointer is not None)
                    chunks.append(metrics)
                    bar.update(hi - lo)
                    stop = flag.agreed() if hi < steps_per_epoch else None
                    if stop is not None:
                        meta = {"epoch": epoch, "step": hi, "history": history,
                                "partial": _pack_metrics(chunks), "seconds": seconds(),
                                **geometry}
                        _save(checkpointer, epoch + 1, state, meta, config.desc)
                        _stop(stop, config.desc, checkpointer, epoch, hi)
                stacked = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
                record = {"epoch": epoch + 1, **summarize(stacked)}
                history.append(record)
                bar.set_postfix(
                    {k: f"{v:.3g}" for k, v in record.items() if isinstance(v, float)}
                )
                due = (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs
                stop = flag.agreed()
                if checkpointer is not None and (due or stop is not None):
                    meta = {"epoch": epoch + 1, "history": history, "seconds": seconds(),
                            **geometry}
                    _save(checkpointer, epoch + 1, state, meta, config.desc)
                    if stop is not None:
                        _stop(stop, config.desc, checkpointer, epoch + 1, 0)
    finally:
        bar.close()
    return state, history


def earlier_seconds(directory) -> float:
    """Wall-clock seconds that earlier sessions of a run checkpointed in ``directory`` spent
    training (the ``seconds`` of its latest checkpoint; 0 when there is none), so a resumed
    run can report the time of all its sessions, not only of the last one."""
    if directory is None or not Path(directory).is_dir():
        return 0.0
    with Checkpointer(directory) as ckpt:
        return float(ckpt.metadata().get("seconds", 0.0))


def _stop(signum: int, desc: str, checkpointer: Checkpointer, epoch: int, step: int):
    where = f"epoch {epoch}" if step == 0 else f"step {step} of epoch {epoch + 1}"
    name = signal.Signals(signum).name
    note = (f"{desc}: {name} received; saved the state after {where} in "
            f"{checkpointer.directory}; run the same command again to resume")
    print(note, file=sys.stderr, flush=True)
    raise _stop_exception(signum, note)
