"""Shared pieces of the CIFAR-10 configs (not an experiment itself)."""

import dataclasses

from mcu_jax.experiment import ExperimentConfig, MethodsConfig
from mcu_jax.mcu import MCUConfig
from mcu_jax.methods import default_config
from mcu_jax.problem import ProblemConfig
from mcu_jax.train import TrainConfig

# The paper's schedule for theta_o and RT: 200 epochs, SGD, cosine learning rate from 0.01.
PAPER_SCHEDULE = TrainConfig(epochs=200, lr=0.01, batch_size=128, schedule="cosine")


def cifar10(name: str, model: str, scenario: str, schedule: TrainConfig, seeds) -> ExperimentConfig:
    methods = MethodsConfig(**{
        m: default_config(m, scenario, "cifar10")
        for m in ("ft", "rl", "ga", "neggrad", "salun", "negtv")
    })
    return ExperimentConfig(
        name=name,
        command=f"python experiments/run.py {name} problem.data_dir=DIR",
        problem=ProblemConfig(dataset="cifar10", model=model, scenario=scenario),
        seeds=tuple(seeds),
        original=schedule,
        retrain=schedule,
        methods=("ft", "rl", "ga", "neggrad", "salun", "negtv"),
        method_configs=methods,
        mcu_modes=("fixed", "adaptive"),
        # The paper: 10 epochs of curve training for random forgetting, 5 class-wise.
        mcu=MCUConfig(epochs=10 if scenario == "random" else 5),
        # MCU's rows: the best of the paper's beta ablation values (its "beta search").
        fixed_betas=(0.1, 0.2, 0.3, 0.5),
        table1=True,
    )


def with_data_dir(cfg: ExperimentConfig, data_dir: str | None) -> ExperimentConfig:
    return dataclasses.replace(cfg, problem=dataclasses.replace(cfg.problem, data_dir=data_dir))
