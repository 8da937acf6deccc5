"""CIFAR-10, ResNet-20, class-wise forgetting at CPU scale: Table 3 and Figure 3b without a GPU.

Command: python experiments/run.py cifar10_resnet20_class_cpu problem.data_dir=DIR

The class-wise twin of `cifar10_resnet20_random_cpu`: the same class-stratified 5,000
training images and whole test set, one seed, theta_o and RT for 20 epochs (cosine from
0.05). The forgotten class is drawn from the seed (its 500 training images are D_f). NegGrad+
and RL with the paper's class-wise CIFAR-10 settings are theta_p (NegGrad+ diverges on this
small model, RL does not), and MCU_beta runs on top of each with the paper's settings
(5 epochs, k = 0.5, k_r = 0.1, t* in [0.75, 1]). About 55 minutes on a 2-core CPU; results
in docs/reproduction.md. `cifar10_resnet20_class` is the full-size run.
"""

import _cifar10


def get_config():
    return _cifar10.cpu_scale("class")
