"""FT: fine-tune theta_o on D_r with cross-entropy (catastrophic forgetting of D_f).

Paper (CIFAR-10): 10 epochs, SGD momentum 0.9, lr 0.01, batch 128.
"""

from __future__ import annotations

import time

import jax

from mcu_jax.methods.base import (
    MethodConfig,
    MethodData,
    MethodResult,
    finish,
    indices,
)
from mcu_jax.methods.registry import register
from mcu_jax.train import fit


@register("ft")
def fine_tune(model, theta_o: dict, data: MethodData, config: MethodConfig, key: jax.Array,
              *, checkpoint_dir=None) -> MethodResult:
    """theta_o trained further on ``split.retain`` only."""
    start = time.perf_counter()
    retain = indices(data, "retain", "ft")
    variables, history = fit(
        model, theta_o, data.train, retain, config.train_config(), key,
        checkpoint_dir=checkpoint_dir, mesh=data.mesh, desc="FT",
    )
    return finish(start, variables, history)
