"""Ablation on digits: k_r (see mcu_jax/ablation.py for what it varies and which figure).

Command: python experiments/run.py digits_ablation_k_r
"""

import _ablations


def get_config():
    return _ablations.digits("k_r")
