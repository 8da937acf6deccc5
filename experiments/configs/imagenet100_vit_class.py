"""ImageNet-100, ViT-B/16 fine-tuned from local pretrained weights, class forgetting (GPU).

Command: python experiments/run.py imagenet100_vit_class problem.data_dir=DIR \
    problem.pretrained=VIT.npz
(DIR holds imagenet100/train/<class>/ and val/<class>/.)
"""

import _large


def get_config():
    return _large.imagenet100("class")
