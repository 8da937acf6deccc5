"""The default experiment: 10% random forgetting on the embedded digits set, on a CPU.

Command: python experiments/run.py digits_random

theta_o and RT train for 15 epochs; NegGrad+ is the pre-unlearning model and MCU_beta runs
on top of it, with the paper's protocol scaled to the 1,437-image set. D_v is 30% of the
test set here (110 images) so that Acc_o(D_v), the forget reference, is not a 40-image
estimate.
"""

import dataclasses

from mcu_jax.experiment import ExperimentConfig, MethodsConfig
from mcu_jax.mcu import MCUConfig
from mcu_jax.methods import default_config
from mcu_jax.problem import ProblemConfig
from mcu_jax.train import TrainConfig


def get_config() -> ExperimentConfig:
    schedule = TrainConfig(epochs=15, lr=0.05, batch_size=128)
    return ExperimentConfig(
        name="digits_random",
        command="python experiments/run.py digits_random",
        problem=ProblemConfig(dataset="digits", model="cnn_small", scenario="random",
                              val_ratio=0.3),
        seeds=(0, 1),
        original=schedule,
        retrain=schedule,
        methods=("neggrad",),
        # Digits-scale NegGrad+: the paper's lr 0.01 / beta 0.15 barely moves a model whose
        # training loss is ~0.003, so both MCU and NegGrad+ use lr 0.05 and beta 0.3 here.
        method_configs=dataclasses.replace(
            MethodsConfig(), neggrad=default_config("neggrad", "random", lr=0.05, beta=0.3)
        ),
        mcu_modes=("adaptive",),
        mcu=MCUConfig(epochs=10, lr=0.05),
    )
