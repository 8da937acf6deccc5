"""The unlearning problem: a data set, a model and a seeded forget/retain split.

A :class:`ProblemConfig` names everything needed to rebuild the same problem later (it is
stored in theta_o's metadata), and :func:`build` turns it into arrays on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mcu_jax import checks, models
from mcu_jax.data import Images, Split, load_dataset, make_split, subsample
from mcu_jax.data.splits import check_request
from mcu_jax.models import check_conv3x3, create
from mcu_jax.models.layers import resolve_dtype


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn_small"
    dtype: str = "float32"  # compute dtype of the model
    # Train-mode BatchNorm (+ ReLU) with a hand-written backward pass that moves fewer bytes
    # (models/batchnorm.py; the models' fused_bn): the same function, rounded differently.
    # Off until measured on a GPU; BatchNorm models only.
    fused_bn: bool = False
    # PreResNet's 1x1 convolutions as one kernel with the BatchNorm + ReLU before them and the
    # statistics after them, and a backward kernel (models/pointwise.py; the model's
    # pointwise): "conv" (default) or "fused" (Pallas kernels where compiled for an NVIDIA
    # GPU, XLA's ops elsewhere): the same function, rounded differently. Off until measured.
    # On several devices each runs the kernels on its own rows (sharding.data_parallel).
    # The sweep then uses the kernel too, whatever SelectionConfig.pointwise says.
    pointwise: str = "conv"
    # With pointwise "fused": PreResNet's stride-1 3x3 convolutions as one kernel with bn2 +
    # ReLU before them and bn3's statistics after them, and a backward kernel
    # (models/conv3x3.py; the model's conv3x3): "conv" (default) or "fused". The same
    # function, rounded differently; off until measured. The sweep then uses it too.
    conv3x3: str = "conv"
    # Local .npz of initial weights for theta_o and RT; PRETRAINED_REQUIRED in a setting that
    # fine-tunes pretrained weights (ImageNet-100's ViT): refused until a file is given
    pretrained: str | None = None
    scenario: str = "random"  # "random" or "class"
    forget_ratio: float = 0.1
    forget_class: int | None = None
    val_ratio: float = 0.1
    retain_ratio: float = 0.5
    seed: int = 0
    # A class-stratified subset of the data set for quick runs (None: all images). It is the
    # same for every seed (drawn from its own seed 0); the split is drawn inside it.
    train_size: int | None = None
    test_size: int | None = None

    def __post_init__(self):
        # What can be checked without the data, so that a bad request fails before any
        # loading or run folder (make_split and create check the rest against the data).
        check_request(self.scenario, self.forget_ratio, self.forget_class, self.val_ratio,
                      self.retain_ratio, self.seed, where="")
        resolve_dtype(self.dtype)
        if checks.flag("fused_bn", self.fused_bn) and self.model in models.MODELS:
            # A model without BatchNorm (a ViT) has no fused_bn field: refuse it now, not
            # after the data set is loaded. Building the module is cheap (no parameters).
            try:
                create(self.model, 2, dtype=self.dtype, fused_bn=True)
            except ValueError as e:
                raise ValueError(f"fused_bn: model {self.model!r} has no fused BatchNorm "
                                 f"(only the BatchNorm models do): {e}") from e
        checks.choice("conv3x3", self.conv3x3, ("conv", "fused"))
        check_conv3x3(checks.choice("pointwise", self.pointwise, ("conv", "fused")),
                      self.conv3x3)
        if self.pointwise != "conv" and self.model in models.MODELS:
            try:  # refused now for a model without the fields, as fused_bn
                create(self.model, 2, dtype=self.dtype, pointwise=self.pointwise,
                       conv3x3=self.conv3x3)
            except ValueError as e:
                raise ValueError(f"pointwise: model {self.model!r} has no fused 1x1 kernel "
                                 f"(only PreResNet does): {e}") from e
        for name in ("train_size", "test_size"):
            checks.optional_integer(name, getattr(self, name), low=1)


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


PRETRAINED_REQUIRED = "required"


def check_pretrained(config: ProblemConfig) -> None:
    """ValueError when the setting fine-tunes pretrained weights and none were given."""
    if config.pretrained == PRETRAINED_REQUIRED:
        raise ValueError(f"problem.pretrained: this setting fine-tunes pretrained weights "
                         f"({config.model} on {config.dataset}, as the paper): give a local "
                         ".npz of them as problem.pretrained=FILE.npz (models.load_pretrained "
                         "reads it; experiments/paper.py: --pretrained FILE.npz)")


def check(config: ProblemConfig) -> None:
    """Raises what :func:`build` would (missing data, a split or model that cannot be made)
    without putting the images on the device: to refuse a request before a run starts."""
    _parts(config)


def _parts(config: ProblemConfig) -> tuple[Any, Split, Any]:
    check_pretrained(config)
    dataset = subsample(load_dataset(config.dataset, config.data_dir),
                        config.train_size, config.test_size)
    split = make_split(
        dataset,
        scenario=config.scenario,
        forget_ratio=config.forget_ratio,
        forget_class=config.forget_class,
        val_ratio=config.val_ratio,
        retain_ratio=config.retain_ratio,
        seed=config.seed,
    )
    return dataset, split, create(config.model, dataset.num_classes, dtype=config.dtype,
                                  fused_bn=config.fused_bn, pointwise=config.pointwise,
                                  conv3x3=config.conv3x3)


def build(config: ProblemConfig) -> Problem:
    """Loads the data (and its subset), draws the split from the seed, creates the model."""
    dataset, split, model = _parts(config)
    return Problem(
        config=config,
        dataset=dataset,
        split=split,
        model=model,
        train=Images.from_dataset(dataset, "train"),
        test=Images.from_dataset(dataset, "test"),
    )
