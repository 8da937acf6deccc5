"""Shared builder of the paper's settings (CIFAR-10, Tiny-ImageNet, ImageNet-100; not an
experiment itself): every method and the curve training with the paper's numbers."""

from mcu_jax.experiment import PAPER_BETAS, TABLE1_METHODS, ExperimentConfig, MethodsConfig
from mcu_jax.mcu import paper_config
from mcu_jax.methods import default_config
from mcu_jax.problem import ProblemConfig


def build(name, dataset, model, scenario, setting, schedule, pretrained=None, seeds=range(3),
          args="problem.data_dir=DIR") -> ExperimentConfig:
    """The six methods as theta_p, each with MCU (its beta searched over the paper's values)
    and MCU_beta, with the paper's numbers for ``setting`` (``methods.default_config``,
    ``mcu.paper_config``) and the Table 1 layout; ``schedule`` trains theta_o and RT;
    ``args``: the command-line overrides the config's command names."""
    configs = {m: default_config(m, scenario, setting) for m in TABLE1_METHODS}
    return ExperimentConfig(
        name=name,
        command=f"python experiments/run.py {name} {args}",
        problem=ProblemConfig(dataset=dataset, model=model, scenario=scenario,
                              pretrained=pretrained),
        seeds=tuple(seeds),
        original=schedule,
        retrain=schedule,
        methods=TABLE1_METHODS,
        method_configs=MethodsConfig(**configs),
        mcu_modes=("fixed", "adaptive"),
        mcu=paper_config(scenario, setting),
        fixed_betas=PAPER_BETAS,  # MCU's rows: the paper's "beta search"
        table1=True,
    )
