"""Table 3 on the embedded digits set: class-wise forgetting with all six pre-unlearning
methods, each with MCU (fixed beta, searched) and MCU_beta on top of it, on a CPU.

Command: python experiments/run.py digits_methods_class

The digits_class setting (whose theta_o, RT and NegGrad+ it shares) with FT, RL, GA,
NegGrad+, SalUn and NegTV as theta_p (the paper's class-wise CIFAR-10 hyperparameters), two
seeds. MCU (fixed beta) takes the best of the paper's beta values, as the paper's MCU rows.
"""

import _digits
import digits_class


def get_config():
    return _digits.six_methods(digits_class.get_config(), "digits_methods_class")
