"""RL: random labels. D_f is relabelled with a random *wrong* class and trained on together
with D_r (one shuffled pool, mixed batches).

The wrong label is ``(y + r) % C`` with ``r`` uniform in ``{1, ..., C-1}``: uniform over the
C-1 other classes and never the true one. ``MethodConfig.relabel`` says when it is drawn:
"epoch" (default) draws a new one every time a D_f sample is in a batch, i.e. every epoch,
as the authors' release (its random-label data set draws one per loaded sample); "once"
draws them once per run from the method's key and keeps them (SalUn's relabelled forget
set; SalUn's release draws with ``randint(0, C)``, which keeps the true label for 1/C of
D_f). Paper (CIFAR-10): 10 epochs, lr 0.01.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import evaluation
from mcu_jax.methods.base import (
    MethodConfig,
    MethodData,
    MethodResult,
    finish,
    forget_flags,
    indices,
    num_classes,
)
from mcu_jax.methods.registry import register
from mcu_jax.train import fit


def random_wrong_labels(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """A label uniform over the ``num_classes - 1`` classes other than ``labels`` (per row)."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; random wrong labels need at least 2")
    shift = jax.random.randint(key, labels.shape, 1, num_classes, dtype=labels.dtype)
    return (labels + shift) % num_classes


def relabelled(key: jax.Array, labels, forget, num_classes: int) -> jax.Array:
    """``labels`` (all N training labels) with the ``forget`` rows replaced by random wrong
    labels, drawn once from ``key``."""
    labels = jnp.asarray(labels, jnp.int32)
    forget = jnp.asarray(forget, jnp.int32)
    return labels.at[forget].set(random_wrong_labels(key, labels[forget], num_classes))


def make_loss():
    """Cross-entropy against each row's target: the true label on D_r; on D_f the run's
    fixed wrong label ``aux["targets"]`` (:func:`relabelled`, ``relabel="once"``) or, with
    ``aux["is_forget"]`` instead, a new random wrong label drawn from the step's key."""

    def loss_fn(logits, labels, aux, key):
        if "targets" in aux:
            targets = aux["targets"]
        else:
            wrong = random_wrong_labels(key, labels, logits.shape[-1])
            targets = jnp.where(aux["is_forget"], wrong, labels)
        out = evaluation.per_sample_outputs(logits, targets)
        loss = out["loss"].mean()
        return loss, {"loss": loss, "acc": 100.0 * out["correct"].mean()}

    return loss_fn


def _pool(data: MethodData, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The training pool D_r + D_f, and D_f."""
    forget = indices(data, "forget", method)
    return np.concatenate([indices(data, "retain", method), forget]), forget


def pool_and_flags(data: MethodData, method: str) -> tuple[np.ndarray, dict]:
    """The training pool D_r + D_f and the per-example ``is_forget`` aux flag."""
    pool, forget = _pool(data, method)
    return pool, {"is_forget": jnp.asarray(forget_flags(data.train.num_examples, forget))}


def train_random_labels(model, theta_o, data, config, key, *, update_mask=None,
                        checkpoint_dir=None, method="rl", desc="RL"):
    """RL's training loop (shared with SalUn, which adds ``update_mask``), training with
    ``fold_in(key, 0)``; D_f relabelled every epoch from the step keys, or
    (``config.relabel == "once"``) once from ``fold_in(key, 1)``."""
    if config.relabel == "once":
        pool, forget = _pool(data, method)
        aux = {"targets": relabelled(jax.random.fold_in(key, 1), data.train.y, forget,
                                     num_classes(model))}
    else:
        pool, aux = pool_and_flags(data, method)
    return fit(
        model, theta_o, data.train, pool, config.train_config(), jax.random.fold_in(key, 0),
        loss_fn=make_loss(), aux=aux, update_mask=update_mask,
        checkpoint_dir=checkpoint_dir, mesh=data.mesh, desc=desc,
    )


@register("rl")
def random_labels(model, theta_o: dict, data: MethodData, config: MethodConfig,
                  key: jax.Array, *, checkpoint_dir=None) -> MethodResult:
    """theta_o trained on D_r with true labels and D_f with random wrong labels."""
    start = time.perf_counter()
    variables, history = train_random_labels(
        model, theta_o, data, config, key, checkpoint_dir=checkpoint_dir
    )
    return finish(start, variables, history)
