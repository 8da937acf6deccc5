"""Pre-unlearning methods: producers of theta_p, the far end point of an MCU curve.

Built-in methods, by registered name (one module each):

- ``rt``: retrain from scratch on D_r (:mod:`~mcu_jax.methods.rt`);
- ``ft``: fine-tune theta_o on D_r (:mod:`~mcu_jax.methods.ft`);
- ``rl``: random wrong labels on D_f, trained with D_r (:mod:`~mcu_jax.methods.rl`);
- ``ga``: gradient ascent on D_f (:mod:`~mcu_jax.methods.ga`);
- ``neggrad``: NegGrad+, CE_r - beta CE_f on mixed batches (:mod:`~mcu_jax.methods.neggrad`);
- ``salun``: RL restricted to a saliency mask (:mod:`~mcu_jax.methods.salun`);
- ``negtv``: negated task vector of a fine-tune on D_f (:mod:`~mcu_jax.methods.negtv`).

Every method is ``fn(model, theta_o, data: MethodData, config: MethodConfig, key, *,
checkpoint_dir=None) -> MethodResult`` and works for both forgetting scenarios (it only reads
``split.forget`` and ``split.retain``). ``default_config(name, scenario, setting)`` gives the
paper's hyperparameters; ``produce(name, ...)`` runs a method once and reuses its saved
result. Add a method with ``@register("name")``.
"""

# Importing the method modules registers them.
from mcu_jax.methods import ft, ga, neggrad, negtv, rl, rt, salun  # noqa: F401
from mcu_jax.methods.base import (
    MethodConfig,
    MethodData,
    MethodResult,
    default_config,
    negtv_alpha,
    setting_of,
)
from mcu_jax.methods.negtv import negate_task_vector
from mcu_jax.methods.registry import available, get, produce, register, run
from mcu_jax.methods.rl import random_wrong_labels
from mcu_jax.methods.salun import forget_gradient, saliency_mask

__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodData",
    "MethodResult",
    "available",
    "default_config",
    "negtv_alpha",
    "setting_of",
    "forget_gradient",
    "get",
    "negate_task_vector",
    "produce",
    "random_wrong_labels",
    "register",
    "run",
    "saliency_mask",
]


def __getattr__(attr: str):
    # METHODS is computed on access so that it includes methods registered later.
    if attr == "METHODS":
        return available()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
