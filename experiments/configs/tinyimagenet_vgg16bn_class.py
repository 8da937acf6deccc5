"""Tiny-ImageNet, VGG-16-BN (the correct 13-convolution network), class forgetting (GPU).

Command: python experiments/run.py tinyimagenet_vgg16bn_class problem.data_dir=DIR
(DIR holds tiny-imagenet-200/.)
"""

import _large


def get_config():
    return _large.tinyimagenet("class")
