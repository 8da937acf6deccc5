"""Table 3 on the embedded digits set: class-wise forgetting with all six pre-unlearning
methods, each with MCU (fixed beta, searched) and MCU_beta on top of it, on a CPU.

Command: python experiments/run.py digits_methods_class

The digits_class setting (whose theta_o, RT and NegGrad+ it shares) with FT, RL, GA,
NegGrad+, SalUn and NegTV as theta_p (the paper's class-wise CIFAR-10 hyperparameters), two
seeds. MCU (fixed beta) takes the best of the paper's beta values, as the paper's MCU rows.
"""

import dataclasses

import digits_class

from mcu_jax.experiment import TABLE1_METHODS


def get_config():
    return dataclasses.replace(
        digits_class.get_config(),
        name="digits_methods_class",
        command="python experiments/run.py digits_methods_class",
        methods=TABLE1_METHODS,
        mcu_modes=("fixed", "adaptive"),
        fixed_betas=(0.1, 0.2, 0.3, 0.5),  # MCU's rows: the paper's "beta search"
        models_from="digits_class",
    )
