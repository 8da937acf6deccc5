"""Ablation on digits: forgetting (see mcu_jax/ablation.py for what it varies and which figure).

Command: python experiments/run.py digits_ablation_forgetting
"""

import _ablations


def get_config():
    return _ablations.digits("forgetting")
