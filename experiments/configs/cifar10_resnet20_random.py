"""CIFAR-10, ResNet-20, random forgetting: a scaled schedule for one GPU
(not yet timed on one).

Command: python experiments/run.py cifar10_resnet20_random problem.data_dir=DIR

theta_o and RT train 30 epochs (cosine from 0.05) instead of the paper's 200; methods and
MCU use the paper's CIFAR-10 hyperparameters.
"""

import _cifar10

from mcu_jax.train import TrainConfig


def get_config():
    schedule = TrainConfig(epochs=30, lr=0.05, batch_size=128, schedule="cosine")
    return _cifar10.cifar10("cifar10_resnet20_random", "resnet20", "random", schedule,
                            seeds=range(3))
