"""Shared pieces of the CIFAR-10 configs (not an experiment itself)."""

import dataclasses

from _paper import build

from mcu_jax.experiment import ExperimentConfig
from mcu_jax.train import TrainConfig

# The paper's schedule for theta_o and RT: 200 epochs, SGD, cosine learning rate from 0.01.
PAPER_SCHEDULE = TrainConfig(epochs=200, lr=0.01, batch_size=128, schedule="cosine")


def cifar10(name: str, model: str, scenario: str, schedule: TrainConfig, seeds) -> ExperimentConfig:
    """CIFAR-10 with the paper's numbers (``_paper.build``; the paper: 10 epochs of curve
    training for random forgetting, 5 class-wise)."""
    return build(name, "cifar10", model, scenario, "cifar10", schedule, seeds=seeds)


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
