"""Ablation on digits: the mask (Figure 2; see mcu_jax/ablation.py for what it varies).

Command: python experiments/run.py digits_ablation_mask
"""

import _ablations


def get_config():
    return _ablations.digits("mask")
