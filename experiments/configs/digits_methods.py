"""Table 1 (and Table 2's MCU rows) on the embedded digits set: all six pre-unlearning methods,
each with MCU (fixed beta) and MCU_beta on top of it, on a CPU.

Command: python experiments/run.py digits_methods

The digits_random setting (whose theta_o, RT and NegGrad+ it shares) with FT, RL, GA,
NegGrad+, SalUn and NegTV as theta_p, two seeds, and the paper's Table 1 layout with the mean
relative Avg. Gap reduction. The five methods other than NegGrad+ keep the paper's CIFAR-10
hyperparameters (NegGrad+ is digits_random's). MCU (fixed beta) takes the best of the
paper's beta values, as the paper's MCU rows do.
"""

import dataclasses

import _digits
import digits_random


def get_config():
    cfg = _digits.six_methods(digits_random.get_config(), "digits_methods")
    return dataclasses.replace(cfg, table1=True)
