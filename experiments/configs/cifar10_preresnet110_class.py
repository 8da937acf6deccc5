"""CIFAR-10, PreResNet-110, class forgetting, with the paper's full schedule (GPU).

Command: python experiments/run.py cifar10_preresnet110_class problem.data_dir=DIR
(DIR holds cifar10_jpeg.npz or the official CIFAR-10 files.)
"""

import _cifar10


def get_config():
    return _cifar10.cifar10("cifar10_preresnet110_class", "preresnet110", "class",
                            _cifar10.PAPER_SCHEDULE, seeds=range(5))
