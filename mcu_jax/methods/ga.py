"""GA: gradient ascent on D_f, i.e. SGD on the negated cross-entropy of the forget set.

Paper (CIFAR-10): 5 epochs, lr 0.01. The loss (-CE) falls without bound, so the history
records the forget cross-entropy as ``ce`` next to ``loss``.
"""

from __future__ import annotations

import time

import jax

from mcu_jax import evaluation
from mcu_jax.methods.base import (
    MethodConfig,
    MethodData,
    MethodResult,
    finish,
    indices,
)
from mcu_jax.methods.registry import register
from mcu_jax.train import fit


def ascent_loss(logits, labels, aux, key):
    """Negated mean cross-entropy (the objective GA minimises) and batch metrics."""
    del aux, key
    out = evaluation.per_sample_outputs(logits, labels)
    ce = out["loss"].mean()
    return -ce, {"loss": -ce, "ce": ce, "acc": 100.0 * out["correct"].mean()}


@register("ga")
def gradient_ascent(model, theta_o: dict, data: MethodData, config: MethodConfig,
                    key: jax.Array, *, checkpoint_dir=None) -> MethodResult:
    """theta_o trained on ``split.forget`` to maximise its cross-entropy."""
    start = time.perf_counter()
    forget = indices(data, "forget", "ga")
    variables, history = fit(
        model, theta_o, data.train, forget, config.train_config(), key,
        loss_fn=ascent_loss, checkpoint_dir=checkpoint_dir, mesh=data.mesh, desc="GA",
    )
    return finish(start, variables, history)
