"""Ablation on digits: retain_share (see mcu_jax/ablation.py for what it varies and which figure).

Command: python experiments/run.py digits_ablation_retain_share
"""

import _ablations


def get_config():
    return _ablations.digits("retain_share")
