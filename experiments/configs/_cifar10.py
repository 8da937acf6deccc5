"""Shared pieces of the CIFAR-10 configs (not an experiment itself)."""

import dataclasses

from mcu_jax.experiment import PAPER_BETAS, ExperimentConfig, MethodsConfig
from mcu_jax.mcu import paper_config
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
        mcu=paper_config(scenario, "cifar10"),
        fixed_betas=PAPER_BETAS,  # MCU's rows: the paper's "beta search"
        table1=True,
    )


def cpu_scale(scenario: str) -> ExperimentConfig:
    """``cifar10_resnet20_{scenario}_cpu``: ResNet-20 on a class-stratified 5,000-image
    subset (the whole test set), one seed, theta_o and RT 20 epochs (cosine from 0.05),
    NegGrad+ (class-wise also RL) and MCU_beta on each with the paper's settings: 30 to 55
    minutes on a 2-core CPU."""
    name = f"cifar10_resnet20_{scenario}_cpu"
    schedule = TrainConfig(epochs=20, lr=0.05, batch_size=128, schedule="cosine")
    cfg = cifar10(name, "resnet20", scenario, schedule, seeds=(0,))
    return dataclasses.replace(
        cfg,
        problem=dataclasses.replace(cfg.problem, train_size=5_000),
        # Class-wise, the paper's NegGrad+ diverges on this small model (its forget loss grows
        # without bound and takes D_r with it), so RL, which does not, is a second theta_p.
        methods=("neggrad",) if scenario == "random" else ("neggrad", "rl"),
        mcu_modes=("adaptive",),
        fixed_betas=(),  # no MCU (fixed beta) rows
        table1=False,
    )


def with_data_dir(cfg: ExperimentConfig, data_dir: str | None) -> ExperimentConfig:
    return dataclasses.replace(cfg, problem=dataclasses.replace(cfg.problem, data_dir=data_dir))
