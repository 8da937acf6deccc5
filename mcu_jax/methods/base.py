"""What every pre-unlearning method shares: its inputs, its result and its hyperparameters.

A method turns the original model theta_o into a pre-unlearned model theta_p (the far end
point of the MCU curve). It is a function

    method(model, theta_o, data, config, key, *, checkpoint_dir=None) -> MethodResult

with ``theta_o`` the Flax variables ``{"params", "batch_stats"}``, ``data`` a
:class:`MethodData`, ``config`` a :class:`MethodConfig` and ``key`` a ``jax.random`` key.
``checkpoint_dir`` (optional) is handed to :func:`mcu_jax.train.fit`, so an interrupted method
resumes at its last finished epoch. A method never modifies ``theta_o`` (the training loop
donates only its own copy of the state).

:func:`default_config` gives the paper's hyperparameters (``NOTES.md``, "Baselines"); every
field can be overridden with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from mcu_jax import checks, runs
from mcu_jax.data.batching import check_indices
from mcu_jax.data.device import Images
from mcu_jax.data.splits import SCENARIOS
from mcu_jax.protocols import check_setting, setting_of
from mcu_jax.train import SCHEDULES, TrainConfig

RELABEL = ("epoch", "once")
BN_MODES = ("recompute", "arithmetic", "original")


@dataclasses.dataclass(frozen=True)
class MethodData:
    """The data a method may use: device-resident train/test images, the split and the
    model's input shape ((H, W, C) or (N, H, W, C), for a fresh initialisation).

    ``mesh`` (optional, ``mcu_jax.sharding.make_mesh``) makes the method's training loop data
    parallel over the mesh's devices (``train.fit(..., mesh=...)``), and SalUn's saliency
    gradient and NegTV's BatchNorm pass too; the batch size (and SalUn's
    ``grad_batch_size``) must then be divisible by the number of devices. None: one device."""

    train: Images
    test: Images
    split: Any  # mcu_jax.data.splits.Split
    input_shape: tuple[int, ...]
    mesh: Any = None  # jax.sharding.Mesh or None


@dataclasses.dataclass
class MethodResult:
    """theta_p and how it was made.

    ``variables``: ``{"params", "batch_stats"}`` of theta_p; ``minutes``: wall-clock minutes
    of the method (when reused from disk, the minutes of the run that made it); ``history``:
    per-epoch metrics of its training loop; ``info``: method-specific extras (e.g. SalUn's
    mask, NegTV's alpha); ``reused``: True when :func:`~mcu_jax.methods.produce` loaded it.
    """

    variables: dict
    minutes: float
    history: list[dict]
    info: dict = dataclasses.field(default_factory=dict)
    reused: bool = False


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Hyperparameters of a pre-unlearning method (SGD as ``torch.optim.SGD``).

    Common: ``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay`` (1e-4, the
    authors' release's default), ``schedule`` (``train.SCHEDULES``; default "cosine_epoch",
    the release's per-epoch cosine), ``steps_per_call`` (steps compiled into one call) and
    ``progress`` (progress bar). Method-specific (ignored by the others):

    - ``beta``: NegGrad+'s weight of the forget loss (loss = CE_r - beta CE_f);
    - ``fraction``: SalUn's share of all parameter elements that may change;
    - ``alpha``: NegTV's scale of the negated task vector (None: the paper's value for the
      scenario, :func:`negtv_alpha`);
    - ``ft_epochs``: NegTV's epochs of fine-tuning on D_f (None: ``epochs``);
    - ``relabel``: RL's and SalUn's random wrong labels of D_f: "epoch" draws new ones every
      epoch (the authors' release draws one each time a sample is loaded), "once" draws
      them once per run (SalUn's release relabels its forget set once);
    - ``bn``: NegTV's BatchNorm statistics for the new parameters: "recompute" (over D_r,
      the default), "arithmetic" (the same task arithmetic on the running statistics,
      variances clipped at 0) or "original" (theta_o's statistics);
    - ``grad_batch_size``: batch size of SalUn's evaluation-mode gradient pass over D_f (a
      speed/memory knob only: the summed gradient is exact for any batch size, unless
      ``saliency_augment`` draws each batch's augmentation);
    - ``saliency_augment``: SalUn's saliency from the training-augmented images of D_f, as
      the release reads its training loader (False: the images as stored).
    """

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine_epoch"
    beta: float = 0.15
    alpha: float | None = None
    fraction: float = 0.5
    ft_epochs: int | None = None
    relabel: str = "epoch"
    bn: str = "recompute"
    saliency_augment: bool = False
    grad_batch_size: int = 256
    steps_per_call: int = 50
    progress: bool = True
    checkpoint_every: int = 1  # epochs between checkpoints of an interrupted-run-safe method

    def __post_init__(self):
        counts = {name: checks.integer(name, getattr(self, name), 0 if name == "epochs" else 1)
                  for name in ("epochs", "batch_size", "steps_per_call", "grad_batch_size",
                               "checkpoint_every")}
        numbers = {
            "lr": checks.number("lr", self.lr, positive=True),
            "momentum": checks.number("momentum", self.momentum, low=0, below=1),
            "weight_decay": checks.number("weight_decay", self.weight_decay, low=0),
            "beta": checks.number("beta", self.beta),
            "alpha": None if self.alpha is None else checks.number("alpha", self.alpha),
            "fraction": checks.fraction("fraction", self.fraction),
            "ft_epochs": checks.optional_integer("ft_epochs", self.ft_epochs, 0),
        }
        checks.choice("schedule", self.schedule, SCHEDULES)
        checks.choice("relabel", self.relabel, RELABEL)
        checks.choice("bn", self.bn, BN_MODES)
        for name in ("saliency_augment", "progress"):  # "no" would read as True
            checks.flag(name, getattr(self, name))
        # Plain Python numbers, so configs compare equal and serialise to JSON.
        for name, value in {**counts, **numbers}.items():
            object.__setattr__(self, name, value)

    def train_config(self, epochs: int | None = None) -> TrainConfig:
        """The :class:`~mcu_jax.train.TrainConfig` of this method's training loop."""
        return TrainConfig(
            epochs=self.epochs if epochs is None else int(epochs),
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            steps_per_call=self.steps_per_call,
            progress=self.progress,
            checkpoint_every=self.checkpoint_every,
        )

    def result_fields(self) -> dict:
        """The fields that determine the result: all but the speed settings (progress,
        steps_per_call, checkpoint_every and grad_batch_size; the last one stays when
        ``saliency_augment`` is set, because it decides which batch, hence which random
        crop, each image of the saliency pass gets)."""
        speed = runs.SPEED_FIELDS + (() if self.saliency_augment else ("grad_batch_size",))
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in speed}


# The paper's protocols (appendix C; NOTES.md, "Baselines"): SGD momentum 0.9, batch 128.
# Where the paper is silent the authors' release decides: weight decay 1e-4 and a cosine
# learning rate stepped per epoch for every baseline (MethodConfig's defaults). RT retrains
# from scratch with theta_o's schedule. CIFAR-100 takes CIFAR-10's numbers.
_PROTOCOLS = {
    "cifar10": {
        "rt": dict(epochs=200, lr=0.01, schedule="cosine"),
        "ft": dict(epochs=10), "rl": dict(epochs=10), "salun": dict(epochs=10, fraction=0.5),
        "ga": dict(epochs=5), "neggrad": dict(epochs=5, beta=0.15),
        "negtv": dict(epochs=10),  # fine-tuning on D_f
    },
    # A pretrained ViT: theta_o / RT fine-tune 30 epochs at lr 0.001 (RT from the pretrained
    # weights, which the experiment runner's RT row does; the "rt" method starts from a fresh
    # initialisation); FT, RL, SalUn 5 epochs, GA, NegGrad+ 2, NegTV 5, all at lr 0.001 (the
    # paper gives the rate for NegTV; we assume it for the others).
    "imagenet100": {
        "rt": dict(epochs=30, lr=0.001, schedule="cosine"),
        "ft": dict(epochs=5, lr=0.001), "rl": dict(epochs=5, lr=0.001),
        "salun": dict(epochs=5, lr=0.001, fraction=0.5), "ga": dict(epochs=2, lr=0.001),
        "neggrad": dict(epochs=2, lr=0.001, beta=0.15), "negtv": dict(epochs=5, lr=0.001),
    },
}
_PROTOCOLS["cifar100"] = _PROTOCOLS["cifar10"]
# Tiny-ImageNet: theta_o / RT 100 epochs at lr 0.1; FT, RL, SalUn 10 epochs at lr 0.01; GA
# and NegGrad+ 5 epochs (the paper gives no rate: 0.01 assumed), NegTV's fine-tuning 10 at lr
# 0.01 (appendix C, whose sentence resumes after Table 2): CIFAR-10's numbers.
_PROTOCOLS["tinyimagenet"] = {**_PROTOCOLS["cifar10"],
                              "rt": dict(epochs=100, lr=0.1, schedule="cosine")}
_NEGTV_ALPHA = {
    ("cifar10", "random"): 0.9,
    ("cifar10", "class"): 0.2,
    ("cifar100", "random"): 0.9,
    ("cifar100", "class"): 0.2,
    ("tinyimagenet", "random"): 0.1,
    ("tinyimagenet", "class"): 0.1,
    ("imagenet100", "random"): 0.9,
    ("imagenet100", "class"): 0.9,
}


def negtv_alpha(scenario: str, setting: str = "cifar10") -> float:
    """The paper's NegTV alpha: 0.9 for random and 0.2 for class-wise forgetting (CIFAR-10;
    CIFAR-100 the same), 0.1 on Tiny-ImageNet, 0.9 on ImageNet-100; other data sets take
    CIFAR-10's."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}; expected one of {SCENARIOS}")
    return _NEGTV_ALPHA[(setting_of(setting), scenario)]


def default_config(method: str, scenario: str = "random", setting: str = "cifar10",
                   **overrides: Any) -> MethodConfig:
    """The paper's hyperparameters for ``method`` in ``scenario`` ("random" or "class").

    ``setting`` is "cifar10" (the paper's CIFAR-10 protocol), "cifar100" (the same numbers;
    the paper gives no others), "tinyimagenet" or "imagenet100" (their epochs, learning
    rates and NegTV alpha from the paper's appendix C). A method registered by the user gets
    the common defaults (:class:`MethodConfig`). ``overrides`` replace fields.
    """
    from mcu_jax.methods.registry import get  # the registry imports this module

    get(method)  # unknown method -> ValueError listing the known ones
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}; expected one of {SCENARIOS}")
    setting = check_setting(setting)
    fields = dict(_PROTOCOLS[setting].get(method, {}))
    if method == "negtv":
        fields["alpha"] = negtv_alpha(scenario, setting)
    checks.known_fields("default_config", MethodConfig, overrides)
    fields.update(overrides)
    return MethodConfig(**fields)


# ------------------------------------------------------------------------------------------
# helpers shared by the method modules
# ------------------------------------------------------------------------------------------


def indices(data: MethodData, name: str, method: str) -> np.ndarray:
    """``data.split.<name>`` as int32, non-empty (an empty D_f or D_r cannot be unlearned
    with) and inside the training images (an index past them would fail deep in a gather)."""
    idx = np.asarray(getattr(data.split, name))
    if idx.size == 0:
        raise ValueError(
            f"{method}: split.{name} is empty (shape {idx.shape}); the method needs a non-empty "
            f"{'forget' if name == 'forget' else 'retain'} set"
        )
    return check_indices(f"{method}: split.{name}", idx, data.train.num_examples)


def forget_flags(num_examples: int, forget: np.ndarray) -> np.ndarray:
    """Per-training-example bool: True for D_f (the ``aux`` of mixed-batch losses)."""
    flags = np.zeros(num_examples, dtype=bool)
    flags[check_indices("forget", forget, num_examples)] = True
    return flags


def finish(start: float, variables: dict, history: list[dict], **info: Any) -> MethodResult:
    """The :class:`MethodResult` of a method that started at ``time.perf_counter() == start``
    (waits for the variables, so the minutes are the real wall-clock time)."""
    jax.block_until_ready(variables)
    return MethodResult(
        variables=variables,
        minutes=(time.perf_counter() - start) / 60.0,
        history=list(history),
        info=info,
    )


def num_classes(model: Any) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        raise ValueError(f"model {type(model).__name__} has no num_classes attribute")
    return int(n)
