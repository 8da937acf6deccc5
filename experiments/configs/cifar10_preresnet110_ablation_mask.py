"""Ablation on CIFAR-10 / PreResNet-110 (the paper's setting, GPU): the mask (Figure 2).

Command: python experiments/run.py cifar10_preresnet110_ablation_mask \
    experiment.problem.data_dir=DIR
"""

import _ablations


def get_config():
    return _ablations.cifar10("mask")
