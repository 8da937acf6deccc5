"""NegGrad+: descend on D_r and ascend on D_f in the same mixed batches.

loss = CE(retain rows) - beta * CE(forget rows), each the mean over its own rows of the batch;
a part with no rows contributes 0 (never NaN). The batches are drawn from the shuffled union
D_r + D_f. ``beta`` defaults to 0.15, the value of the public NegGrad+ code (Kurmanji et al.
write alpha CE_r - (1 - alpha) CE_f, alpha close to 1). Paper (CIFAR-10): 5 epochs, lr 0.01.
"""

from __future__ import annotations

import math
import time

import jax

from mcu_jax import evaluation
from mcu_jax.mcu import split_loss
from mcu_jax.methods.base import (
    MethodConfig,
    MethodData,
    MethodResult,
    finish,
)
from mcu_jax.methods.registry import register
from mcu_jax.methods.rl import pool_and_flags
from mcu_jax.train import fit


def make_loss(beta: float):
    """CE over the retain rows minus ``beta`` times CE over the forget rows
    (``aux["is_forget"]`` flags the forget rows)."""
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta={beta}; expected a finite number")

    def loss_fn(logits, labels, aux, key):
        del key
        out = evaluation.per_sample_outputs(logits, labels)
        ce_r, ce_f, _, _ = split_loss(out["loss"], aux["is_forget"])
        loss = ce_r - beta * ce_f
        return loss, {"loss": loss, "ce_retain": ce_r, "ce_forget": ce_f,
                      "acc": 100.0 * out["correct"].mean()}

    return loss_fn


@register("neggrad")
def neggrad_plus(model, theta_o: dict, data: MethodData, config: MethodConfig,
                 key: jax.Array, *, checkpoint_dir=None) -> MethodResult:
    """theta_o trained on mixed D_r/D_f batches with loss CE_r - beta CE_f."""
    start = time.perf_counter()
    pool, aux = pool_and_flags(data, "neggrad")
    variables, history = fit(
        model, theta_o, data.train, pool, config.train_config(), key,
        loss_fn=make_loss(config.beta), aux=aux, checkpoint_dir=checkpoint_dir,
        desc="NegGrad+", mesh=data.mesh,
    )
    return finish(start, variables, history, beta=config.beta)
