"""Shared builder of the Tiny-ImageNet and ImageNet-100 configs (not an experiment itself)."""

import dataclasses

from mcu_jax.experiment import ExperimentConfig, MethodsConfig
from mcu_jax.mcu import MCUConfig
from mcu_jax.methods import default_config
from mcu_jax.problem import ProblemConfig
from mcu_jax.train import TrainConfig

METHODS = ("ft", "rl", "ga", "neggrad", "salun", "negtv")


def build(name, dataset, model, scenario, setting, schedule, method_epochs, lr, mcu_epochs,
          pretrained=None, seeds=range(3)) -> ExperimentConfig:
    configs = {}
    for m in METHODS:
        cfg = default_config(m, scenario, setting)
        cfg = dataclasses.replace(cfg, epochs=method_epochs[m], lr=lr)
        configs[m] = cfg
    return ExperimentConfig(
        name=name,
        command=f"python experiments/run.py {name} problem.data_dir=DIR",
        problem=ProblemConfig(dataset=dataset, model=model, scenario=scenario,
                              pretrained=pretrained),
        seeds=tuple(seeds),
        original=schedule,
        retrain=schedule,
        methods=METHODS,
        method_configs=MethodsConfig(**configs),
        mcu_modes=("fixed", "adaptive"),
        mcu=MCUConfig(epochs=mcu_epochs, lr=0.01),
        table1=True,
    )


def tinyimagenet(scenario: str) -> ExperimentConfig:
    """Paper appendix C: theta_o/RT 100 epochs at lr 0.1; FT, RL, SalUn 10 epochs and GA,
    NegGrad+ 5 epochs at lr 0.01; NegTV fine-tunes 10 epochs, alpha 0.1; MCU 5 epochs."""
    return build(
        f"tinyimagenet_vgg16bn_{scenario}", "tiny_imagenet", "vgg16_bn", scenario,
        "tinyimagenet", TrainConfig(epochs=100, lr=0.1, schedule="cosine"),
        {"ft": 10, "rl": 10, "salun": 10, "ga": 5, "neggrad": 5, "negtv": 10}, 0.01, 5,
    )


def imagenet100(scenario: str) -> ExperimentConfig:
    """Paper appendix C: a pretrained ViT fine-tuned 30 epochs at lr 0.001 (theta_o, RT);
    FT, RL, SalUn 5 epochs, GA and NegGrad+ 2 epochs, NegTV 5 epochs with alpha 0.9, all at
    lr 0.001 (the paper gives the rate for NegTV; we assume it for the others); MCU 2 epochs.
    Pretrained ViT-B/16 weights come from a local .npz: problem.pretrained=PATH."""
    cfg = build(
        f"imagenet100_vit_{scenario}", "imagenet100", "vit_b16", scenario, "cifar10",
        TrainConfig(epochs=30, lr=0.001, schedule="cosine"),
        {"ft": 5, "rl": 5, "salun": 5, "ga": 2, "neggrad": 2, "negtv": 5}, 0.001, 2,
    )
    negtv = dataclasses.replace(cfg.method_configs.negtv, alpha=0.9)
    return dataclasses.replace(
        cfg, method_configs=dataclasses.replace(cfg.method_configs, negtv=negtv)
    )
