"""CIFAR-10, ResNet-20, random forgetting at CPU scale: a first look without a GPU.

Command: python experiments/run.py cifar10_resnet20_random_cpu problem.data_dir=DIR

A class-stratified subset of 10,000 training and 2,000 test images (`problem.train_size`,
`problem.test_size`; the split is drawn inside it), one seed, theta_o and RT for 10 epochs
(cosine from 0.05), NegGrad+ with the paper's CIFAR-10 settings and MCU_beta on top of it
with the paper's (10 epochs, k = 0.5, k_r = 0.1, 20-point sweep). About an hour on a 2-core
CPU. `cifar10_resnet20_random` is the full-size run.
"""

import dataclasses

import _cifar10

from mcu_jax.train import TrainConfig


def get_config():
    schedule = TrainConfig(epochs=10, lr=0.05, batch_size=128, schedule="cosine")
    cfg = _cifar10.cifar10("cifar10_resnet20_random_cpu", "resnet20", "random", schedule,
                           seeds=(0,))
    return dataclasses.replace(
        cfg,
        problem=dataclasses.replace(cfg.problem, train_size=10_000, test_size=2_000),
        methods=("neggrad",),
        mcu_modes=("adaptive",),
        table1=False,
    )
