"""RT: retrain from scratch on D_r, the gold standard of exact unlearning.

A fresh initialisation (``models.init_variables`` from the method's key; theta_o is not used
except to check that the structures agree) trained on ``split.retain`` with cross-entropy. The
paper retrains with theta_o's schedule: ``default_config("rt", ...)`` gives 200 epochs and a
cosine learning rate from 0.01 on CIFAR-10 (Tiny-ImageNet 100 epochs from 0.1, ImageNet-100 30
from 0.001; the paper's ImageNet-100 RT starts from the pretrained ViT, which the experiment
runner's RT row does and this method does not). A plain ``MethodConfig()`` uses the per-epoch
cosine of the other baselines.
"""

from __future__ import annotations

import time

import jax

from mcu_jax import pytrees
from mcu_jax.methods.base import MethodConfig, MethodData, MethodResult, finish, indices
from mcu_jax.methods.registry import register
from mcu_jax.train import fit


@register("rt")
def retrain(model, theta_o: dict, data: MethodData, config: MethodConfig, key: jax.Array,
            *, checkpoint_dir=None) -> MethodResult:
    """Trains a freshly initialised ``model`` on D_r; ``theta_o`` is only used to check that
    the new variables have its structure."""
    from mcu_jax.models import init_variables

    start = time.perf_counter()
    retain = indices(data, "retain", "rt")
    init_key, train_key = jax.random.split(key)
    variables = init_variables(model, init_key, data.input_shape)
    pytrees.check_compatible(theta_o=theta_o, fresh=variables)
    variables, history = fit(
        model, variables, data.train, retain, config.train_config(), train_key,
        checkpoint_dir=checkpoint_dir, mesh=data.mesh, desc="RT",
    )
    return finish(start, variables, history)
