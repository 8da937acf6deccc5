"""Tiny-ImageNet, VGG-16-BN (the correct 13-convolution network), random forgetting (GPU).

Command: python experiments/run.py tinyimagenet_vgg16bn_random problem.data_dir=DIR
(DIR holds tiny-imagenet-200/.)
"""

import _large


def get_config():
    return _large.tinyimagenet("random")
