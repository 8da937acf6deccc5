"""Shared builder of the Tiny-ImageNet and ImageNet-100 configs (not an experiment itself)."""

from _paper import build

from mcu_jax.experiment import ExperimentConfig
from mcu_jax.problem import PRETRAINED_REQUIRED
from mcu_jax.train import TrainConfig


def tinyimagenet(scenario: str) -> ExperimentConfig:
    """Paper appendix C: theta_o/RT 100 epochs at lr 0.1; FT, RL, SalUn 10 epochs at lr
    0.01; GA and NegGrad+ 5 epochs (lr 0.01 assumed: the paper gives none); NegTV fine-tunes
    10 epochs at lr 0.01, alpha 0.1; MCU 5 epochs at lr 0.01 (the sentence resumes after
    Table 2)."""
    return build(
        f"tinyimagenet_vgg16bn_{scenario}", "tiny_imagenet", "vgg16_bn", scenario,
        "tinyimagenet", TrainConfig(epochs=100, lr=0.1, schedule="cosine"),
    )


def imagenet100(scenario: str) -> ExperimentConfig:
    """Paper appendix C: a pretrained ViT fine-tuned 30 epochs at lr 0.001 (theta_o, RT);
    FT, RL, SalUn 5 epochs, GA and NegGrad+ 2 epochs, NegTV 5 epochs with alpha 0.9, all at
    lr 0.001 (the paper gives the rate for NegTV; we assume it for the others); MCU 2 epochs
    (lr 0.01, as the paper's other data sets: it gives none for ImageNet-100).
    Pretrained ViT-B/16 weights come from a local .npz: problem.pretrained=PATH (the run is
    refused without it)."""
    return build(
        f"imagenet100_vit_{scenario}", "imagenet100", "vit_b16", scenario, "imagenet100",
        TrainConfig(epochs=30, lr=0.001, schedule="cosine"), pretrained=PRETRAINED_REQUIRED,
        args="problem.data_dir=DIR problem.pretrained=VIT.npz",
    )
