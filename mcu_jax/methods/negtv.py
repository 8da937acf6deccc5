"""NegTV: negated task vector. Fine-tune theta_o on D_f to theta_ft, then move the other way:

    theta_p = theta_o - alpha (theta_ft - theta_o)

Paper: 10 epochs of fine-tuning (lr 0.01); alpha = 0.9 for random forgetting and 0.2 for
class-wise forgetting on CIFAR-10, 0.1 on Tiny-ImageNet; on ImageNet-100 5 epochs at lr 0.001
and alpha 0.9 (``methods.default_config(..., setting)`` and ``methods.negtv_alpha``, which
``MethodConfig.alpha=None`` resolves to).

BatchNorm statistics. The running statistics are not parameters: task arithmetic on them
has no meaning (a variance can even turn negative), and theta_o's statistics do not match the
new weights. By default (``config.bn == "recompute"``) they are therefore recomputed for
theta_p with one pass over D_r (``mcu_jax.bn.recompute``: train-mode statistics of batches of
``config.batch_size`` with the training augmentation from a fixed key, averaged over the
set), the same treatment MCU gives every point of a curve.
The alternatives are ``"arithmetic"`` (the formula applied to the running statistics as well,
variances clipped at 0; what task arithmetic on a whole PyTorch ``state_dict`` does) and
``"original"`` (keep theta_o's statistics).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from mcu_jax import bn, pytrees
from mcu_jax.methods.base import (
    MethodConfig,
    MethodData,
    MethodResult,
    finish,
    indices,
    negtv_alpha,
)
from mcu_jax.methods.registry import register
from mcu_jax.train import fit


def negate_task_vector(theta_o_params, theta_ft_params, alpha: float):
    """``theta_o - alpha * (theta_ft - theta_o)`` leaf by leaf (pure; dtypes kept)."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha}; expected a finite number")
    pytrees.check_compatible(theta_o=theta_o_params, theta_ft=theta_ft_params)
    return jax.tree.map(
        lambda o, f: (o - alpha * (f - o)).astype(jnp.result_type(o)),
        theta_o_params, theta_ft_params,
    )


def _arithmetic_stats(stats_o, stats_ft, alpha: float):
    out = negate_task_vector(stats_o, stats_ft, alpha)
    flat = pytrees.flatten(out)
    flat = {p: jnp.maximum(v, 0) if p.split("/")[-1] == "var" else v for p, v in flat.items()}
    return pytrees.unflatten(out, flat)


@register("negtv")
def negtv(model, theta_o: dict, data: MethodData, config: MethodConfig, key: jax.Array,
          *, checkpoint_dir=None) -> MethodResult:
    """Fine-tune on D_f for ``config.ft_epochs`` (None: ``epochs``), then negate the task
    vector with ``config.alpha`` (None: ``negtv_alpha`` of the split's scenario, CIFAR-10's
    values; Tiny-ImageNet's 0.1 must be given, e.g. by ``default_config(..., setting)``);
    BatchNorm statistics as ``config.bn`` says."""
    start = time.perf_counter()
    alpha = config.alpha if config.alpha is not None else negtv_alpha(data.split.scenario)
    forget = indices(data, "forget", "negtv")
    epochs = config.epochs if config.ft_epochs is None else config.ft_epochs
    theta_ft, history = fit(
        model, theta_o, data.train, forget, config.train_config(epochs), key,
        checkpoint_dir=checkpoint_dir, mesh=data.mesh, desc="NegTV fine-tune",
    )
    params = negate_task_vector(theta_o["params"], theta_ft["params"], alpha)
    stats_o = theta_o.get("batch_stats", {})
    if config.bn == "original" or not jax.tree.leaves(stats_o):
        stats = jax.tree.map(lambda a: jnp.array(a, copy=True), stats_o)
        variables = {"params": params, "batch_stats": stats}
    elif config.bn == "arithmetic":
        stats = _arithmetic_stats(stats_o, theta_ft["batch_stats"], alpha)
        variables = {"params": params, "batch_stats": stats}
    else:
        retain = indices(data, "retain", "negtv")
        variables = bn.recompute(
            model, {"params": params, "batch_stats": stats_o}, data.train, retain,
            batch_size=config.batch_size, mesh=data.mesh,
        )
    return finish(start, variables, history, alpha=alpha, bn=config.bn)
