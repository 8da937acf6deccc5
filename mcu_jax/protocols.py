"""Which of the paper's protocols (appendix C) a data set follows.

The paper gives hyperparameters for four settings: CIFAR-10 (CIFAR-100 takes the same),
Tiny-ImageNet and ImageNet-100. Every other data set (digits, your own) follows CIFAR-10's.
The numbers themselves live with what they configure: ``methods.default_config`` (the
pre-unlearning methods) and ``mcu.paper_config`` (curve training).
"""

from __future__ import annotations

SETTINGS = ("cifar10", "cifar100", "tinyimagenet", "imagenet100")
_ALIASES = {"tiny_imagenet": "tinyimagenet", "tiny-imagenet": "tinyimagenet",
            "imagenet-100": "imagenet100"}


def setting_of(dataset: str) -> str:
    """The paper's protocol (a :data:`SETTINGS` name) for data set ``dataset``: its own
    where the paper has one ("tiny_imagenet" -> "tinyimagenet"), CIFAR-10's otherwise."""
    setting = _ALIASES.get(dataset, dataset)
    return setting if setting in SETTINGS else "cifar10"


def check_setting(setting: str) -> str:
    """``setting`` as a :data:`SETTINGS` name (aliases such as "tiny_imagenet" accepted);
    ValueError listing them otherwise."""
    canonical = _ALIASES.get(setting, setting)
    if canonical not in SETTINGS:
        raise ValueError(f"setting={setting!r}; expected one of {SETTINGS}")
    return canonical
