"""CIFAR-10, PreResNet-110, random forgetting, with the paper's full schedule (GPU).

Command: python experiments/run.py cifar10_preresnet110_random problem.data_dir=DIR
(DIR holds cifar10_jpeg.npz or the official CIFAR-10 files.)
"""

import _cifar10


def get_config():
    return _cifar10.cifar10("cifar10_preresnet110_random", "preresnet110", "random",
                            _cifar10.PAPER_SCHEDULE, seeds=range(5))
