"""Shared pieces of the digits configs (not an experiment itself)."""

import dataclasses

from mcu_jax.experiment import PAPER_BETAS, TABLE1_METHODS, ExperimentConfig


def six_methods(base: ExperimentConfig, name: str) -> ExperimentConfig:
    """``base`` with the paper's six methods as theta_p, each with MCU (fixed beta, the best
    of the paper's beta values, as its MCU rows) and MCU_beta on top, sharing ``base``'s
    theta_o, RT and models (``models_from``)."""
    return dataclasses.replace(
        base,
        name=name,
        command=f"python experiments/run.py {name}",
        methods=TABLE1_METHODS,
        mcu_modes=("fixed", "adaptive"),
        fixed_betas=PAPER_BETAS,
        models_from=base.name,
    )
