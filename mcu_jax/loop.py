"""The epoch loop shared by ordinary training and curve training.

A loop state (any pytree) is advanced by a per-batch ``step(state, consts, idx, key)``.
On accelerators several steps run inside one compiled call (``lax.scan``), which cuts
kernel-launch and host overhead; the host only looks at the per-step metrics after each
call, to update the progress bar and to stop on a non-finite loss. After every epoch the
state is checkpointed, so a killed run resumes at the last finished epoch and, with
per-epoch keys derived by ``fold_in``, ends with exactly the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

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


def make_runner(step: Step, unrolled: bool | None = None) -> Callable:
    """Compiles ``step`` into ``run(state, consts, batches, keys) -> (state, metrics)``.

    On accelerators the steps of one call run inside a single ``lax.scan`` (one launch per
    call, state donated). XLA's CPU backend runs convolution gradients inside a while loop
    tens of times slower than in straight-line code, so on CPU (``unrolled``, the default
    there) each step is its own donated jitted call and the host loops over them.
    """
    if unrolled is None:
        unrolled = jax.default_backend() == "cpu"
    if unrolled:
        one = jax.jit(step, donate_argnums=(0,))

        def run_steps(state, consts, batches, keys):
            metrics = []
            for i in range(batches.shape[0]):
                state, m = one(state, consts, batches[i], keys[i])
                metrics.append(m)
            return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

        return run_steps

    def run(state, consts, batches, keys):
        def body(carry, xs):
            idx, key = xs
            return step(carry, consts, idx, key)

        return jax.lax.scan(body, state, (batches, keys))

    return jax.jit(run, donate_argnums=(0,))


def _check_finite(metrics: dict, first_step: int, desc: str) -> None:
    loss = np.asarray(metrics["loss"])
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        step = first_step + int(bad[0])
        raise NonFiniteLossError(
            f"{desc}: loss became {loss[bad[0]]} at step {step}; stopping. "
            "The last good checkpoint (previous epoch) is kept."
        )


def run_epochs(
    runner: Callable,
    state: Any,
    consts: Any,
    pool: jax.Array,
    key: jax.Array,
    config: LoopConfig,
    checkpointer: Checkpointer | None = None,
    summarize: Callable[[dict], dict] | None = None,
) -> tuple[Any, list[dict]]:
    """Runs ``config.epochs`` epochs over the index ``pool``; resumes from ``checkpointer``.

    Returns the final state and a per-epoch history of the mean of every step metric (or
    whatever ``summarize`` makes of the stacked metrics of one epoch).
    """
    pool = jnp.asarray(pool, jnp.int32)
    # The runner donates its state: work on a copy so the caller's arrays stay valid.
    state = jax.tree.map(jnp.array, state)
    history: list[dict] = []
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        start = int(meta["epoch"])
        history = list(meta.get("history", []))
    summarize = summarize or (lambda m: {k: float(np.mean(v)) for k, v in m.items()})
    n = int(pool.shape[0])
    if n == 0:
        raise ValueError(f"{config.desc}: cannot train on an empty index set")
    # Sets smaller than one batch wrap around instead of giving no batch at all.
    drop = config.drop_remainder and n >= config.batch_size
    steps_per_epoch = n // config.batch_size if drop else math.ceil(n / config.batch_size)
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=start * steps_per_epoch,
        desc=config.desc,
        disable=not config.progress,
        leave=False,
    )
    for epoch in range(start, config.epochs):
        ekey = jax.random.fold_in(key, epoch)
        batches = epoch_batches(jax.random.fold_in(ekey, 0), pool, config.batch_size, drop)
        keys = jax.random.split(jax.random.fold_in(ekey, 1), steps_per_epoch)
        chunks = []
        for lo in range(0, steps_per_epoch, config.steps_per_call):
            hi = min(lo + config.steps_per_call, steps_per_epoch)
            state, metrics = runner(state, consts, batches[lo:hi], keys[lo:hi])
            metrics = jax.device_get(metrics)
            _check_finite(metrics, epoch * steps_per_epoch + lo, config.desc)
            chunks.append(metrics)
            bar.update(hi - lo)
        stacked = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        record = {"epoch": epoch + 1, **summarize(stacked)}
        history.append(record)
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if isinstance(v, float)})
        if checkpointer is not None:
            checkpointer.save(epoch + 1, state, {"epoch": epoch + 1, "history": history})
    bar.close()
    return state, history
