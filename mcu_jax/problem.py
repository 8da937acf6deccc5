"""The unlearning problem: a data set, a model and a seeded forget/retain split.

A :class:`ProblemConfig` names everything needed to rebuild the same problem later (it is
stored in theta_o's metadata), and :func:`build` turns it into arrays on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mcu_jax.data import Images, Split, load_dataset, make_split
from mcu_jax.models import create


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn_small"
    dtype: str = "float32"  # compute dtype of the model
    pretrained: str | None = None  # local .npz of initial weights for theta_o and RT
    scenario: str = "random"  # "random" or "class"
    forget_ratio: float = 0.1
    forget_class: int | None = None
    val_ratio: float = 0.1
    retain_ratio: float = 0.5
    seed: int = 0


@dataclasses.dataclass
class Problem:
    config: ProblemConfig
    dataset: Any
    split: Split
    model: Any
    train: Images
    test: Images

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.dataset.x_train.shape[1:])


def build(config: ProblemConfig) -> Problem:
    """Loads the data, draws the split from the seed and creates the model."""
    dataset = load_dataset(config.dataset, config.data_dir)
    split = make_split(
        dataset,
        scenario=config.scenario,
        forget_ratio=config.forget_ratio,
        forget_class=config.forget_class,
        val_ratio=config.val_ratio,
        retain_ratio=config.retain_ratio,
        seed=config.seed,
    )
    model = create(config.model, dataset.num_classes, dtype=config.dtype)
    return Problem(
        config=config,
        dataset=dataset,
        split=split,
        model=model,
        train=Images.from_dataset(dataset, "train"),
        test=Images.from_dataset(dataset, "test"),
    )
