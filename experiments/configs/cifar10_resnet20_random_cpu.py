"""CIFAR-10, ResNet-20, random forgetting at CPU scale: a first look without a GPU.

Command: python experiments/run.py cifar10_resnet20_random_cpu problem.data_dir=DIR

A class-stratified subset of 5,000 training images (`problem.train_size`; the split is drawn
inside it) and the whole test set (so D_v has the paper's 1,000 images: it sets MCU's forget
reference), one seed, theta_o and RT for 20 epochs (cosine from 0.05, long enough for
theta_o to fit its training images better than unseen ones, so that there is something to
forget), NegGrad+ with the paper's CIFAR-10 settings and MCU_beta on top of it with the
paper's (10 epochs, k = 0.5, k_r = 0.1, 20-point sweep). About 30 minutes on a 2-core CPU;
results in docs/reproduction.md.
`cifar10_resnet20_random` is the full-size run.
"""

import _cifar10


def get_config():
    return _cifar10.cpu_scale("random")
