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

import digits_random

from mcu_jax.experiment import TABLE1_METHODS


def get_config():
    return dataclasses.replace(
        digits_random.get_config(),
        name="digits_methods",
        command="python experiments/run.py digits_methods",
        methods=TABLE1_METHODS,
        mcu_modes=("fixed", "adaptive"),
        fixed_betas=(0.1, 0.2, 0.3, 0.5),  # MCU's rows: the paper's "beta search"
        table1=True,
        models_from="digits_random",
    )
