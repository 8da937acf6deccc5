"""Builders of the ablation configs (not an experiment itself)."""

import dataclasses

import cifar10_preresnet110_random
import digits_random

from mcu_jax.ablation import AblationConfig
from mcu_jax.experiment import PAPER_BETAS

# kind -> (values, default value framed in the figure, base method); the paper's settings.
PAPER = {
    "mask": ((0.1,), 0.1, "neggrad"),
    "beta": (PAPER_BETAS, 0.2, "neggrad"),
    "k": ((0.1, 0.3, 0.5, 0.7), 0.5, "neggrad"),
    "k_r": ((0.0, 0.1, 0.2, 0.3), 0.1, "neggrad"),
    "forgetting": ((15, 20), None, "rl"),
    "retain_share": ((0.1, 0.2, 0.3, 0.5, 0.7, 1.0), 0.5, "neggrad"),
}


def digits(kind: str) -> AblationConfig:
    """The ablation on the digits set (CPU minutes), built on the digits_random experiment
    (whose seed-0 theta_o, RT and base models it shares)."""
    values, default, method = PAPER[kind]
    name = f"digits_ablation_{kind}"
    exp = dataclasses.replace(
        digits_random.get_config(), name=name,
        command=f"python experiments/run.py {name}", seeds=(0,),
        methods=(method,), mcu_modes=(), models_from="digits_random",
    )
    if kind == "forgetting":
        values = (2, 10)  # digits scale: RL under-forgets at 2 epochs, over-forgets at 10
    return AblationConfig(experiment=exp, kind=kind, values=values, method=method,
                          default=default)


def cifar10(kind: str) -> AblationConfig:
    """The paper's ablation: CIFAR-10, PreResNet-110, 10% random forgetting (GPU), sharing
    cifar10_preresnet110_random's seed-0 theta_o, RT and base models."""
    values, default, method = PAPER[kind]
    name = f"cifar10_preresnet110_ablation_{kind}"
    exp = dataclasses.replace(
        cifar10_preresnet110_random.get_config(), name=name,
        command=f"python experiments/run.py {name} experiment.problem.data_dir=DIR",
        seeds=(0,), methods=(method,), mcu_modes=(), fixed_betas=(), table1=False,
        models_from="cifar10_preresnet110_random",
    )
    return AblationConfig(experiment=exp, kind=kind, values=values, method=method,
                          default=default)
