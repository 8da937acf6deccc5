"""Ordinary supervised training: the original model theta_o, the retrained model RT, and
the shared loop the pre-unlearning methods build on.

``fit`` trains any model on any index pool of a device-resident image set with SGD
(momentum, weight decay, a per-step cosine, per-epoch cosine (``cosine_epoch``) or constant
learning rate). The per-batch objective is a
``loss_fn(logits, labels, aux, key) -> (loss, metrics)``, so methods such as gradient
ascent, random labels or NegGrad+ only supply a loss (and, for SalUn, an update mask).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mcu_jax import checkpoint, checks, evaluation, loop, runs
from mcu_jax.data.batching import check_indices
from mcu_jax.data.device import Images
from mcu_jax.data.transforms import prepare_batch

LossFn = Callable[[jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, dict]]


#: Learning-rate schedules: "cosine" decays to 0 over the run's steps; "cosine_epoch" is
#: PyTorch's ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch, as the authors'
#: release trains every baseline (constant within an epoch, ``lr (1 + cos(pi e / epochs)) / 2``
#: in epoch e = 0, 1, ...); "constant" keeps ``lr``.
SCHEDULES = ("cosine", "cosine_epoch", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """SGD training hyperparameters (defaults: the paper's CIFAR-10 theta_o / RT schedule)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4  # the authors' release's default (--wd 1e-4)
    schedule: str = "cosine"  # one of SCHEDULES
    steps_per_call: int = 50
    progress: bool = True
    checkpoint_every: int = 1  # epochs between checkpoints when a checkpoint_dir is given

    def __post_init__(self):
        """Checks every field (a float epoch count or a string rate would otherwise fail only
        in the training loop, after ``train_model`` bound its folder) and stores plain Python
        numbers, so configs compare equal and serialise to JSON."""
        values = {
            "epochs": checks.integer("epochs", self.epochs, 0),
            "batch_size": checks.integer("batch_size", self.batch_size, 1),
            "lr": checks.number("lr", self.lr, positive=True),
            "momentum": checks.number("momentum", self.momentum, low=0, below=1),
            "weight_decay": checks.number("weight_decay", self.weight_decay, low=0),
            "schedule": checks.choice("schedule", self.schedule, SCHEDULES),
            "steps_per_call": checks.integer("steps_per_call", self.steps_per_call, 1),
            "progress": checks.flag("progress", self.progress),
            "checkpoint_every": checks.integer("checkpoint_every", self.checkpoint_every, 1),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)


class TrainState(struct.PyTreeNode):
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size) if n >= batch_size else 1


def epoch_cosine_schedule(lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """``lr (1 + cos(pi e / epochs)) / 2`` through epoch ``e = step // steps_per_epoch``:
    PyTorch's ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    epochs = max(1, int(epochs))

    def schedule(count):
        epoch = jnp.asarray(count) // steps_per_epoch
        return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch.astype(jnp.float32) / epochs))

    return schedule


def make_optimizer(
    config: TrainConfig, total_steps: int, update_mask: Any = None,
    steps_per_epoch: int | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (as torch.optim.SGD).

    ``update_mask`` (a pytree of bool or 0/1 arrays shaped like the params) multiplies the
    FINAL update, so masked-out weights never move, weight decay and momentum included.
    The "cosine_epoch" schedule needs ``steps_per_epoch``.
    """
    if config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(config.lr, max(1, total_steps))
    elif config.schedule == "cosine_epoch":
        if steps_per_epoch is None:
            raise ValueError("make_optimizer: schedule 'cosine_epoch' needs steps_per_epoch")
        lr = epoch_cosine_schedule(config.lr, config.epochs, steps_per_epoch)
    else:
        lr = config.lr
    parts = []
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(lr, momentum=config.momentum or None))
    if update_mask is not None:
        parts.append(multiply_updates(update_mask))
    return optax.chain(*parts)


def multiply_updates(mask: Any) -> optax.GradientTransformation:
    """Zeroes each update where the matching mask leaf is 0/False (even an inf update)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        out = jax.tree.map(lambda u, m: jnp.where(jnp.asarray(m, bool), u, 0), updates, mask)
        return out, state

    return optax.GradientTransformation(init, update)


def cross_entropy_loss(logits, labels, aux, key) -> tuple[jax.Array, dict]:
    """Mean cross-entropy and batch accuracy (percent): the default objective."""
    del aux, key
    out = evaluation.per_sample_outputs(logits, labels)
    return out["loss"].mean(), {"loss": out["loss"].mean(), "acc": 100 * out["correct"].mean()}


def make_step(model, loss_fn: LossFn, tx: optax.GradientTransformation) -> loop.Step:
    """One SGD step on the batch ``images[idx]`` with train-mode BatchNorm."""

    def step(state: TrainState, consts, idx, key):
        images, aux = consts
        k_aug, k_drop, k_loss = jax.random.split(key, 3)
        x = prepare_batch(k_aug, images.x[idx], images.mean, images.std, images.augment, True)
        y = images.y[idx]
        aux_b = jax.tree.map(lambda a: a[idx], aux)

        def objective(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": k_drop},
            )
            loss, metrics = loss_fn(logits, y, aux_b, k_loss)
            return loss, (metrics, new.get("batch_stats", state.batch_stats))

        grads, (metrics, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, batch_stats, opt_state), metrics

    return step


def fit(
    model,
    variables: dict,
    images: Images,
    pool,
    config: TrainConfig,
    key: jax.Array,
    *,
    loss_fn: LossFn = cross_entropy_loss,
    aux: Any = None,
    update_mask: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    desc: str = "train",
    mesh: Any = None,
) -> tuple[dict, list[dict]]:
    """Trains ``variables`` on the training indices ``pool``; returns (variables, history).

    ``aux`` is a pytree of per-example arrays (leading axis = number of images) handed to
    ``loss_fn`` for the batch, e.g. a forget flag. With ``checkpoint_dir`` every epoch is
    checkpointed and an interrupted run resumes where it stopped.

    ``mesh`` (``mcu_jax.sharding.make_mesh``) makes training data parallel: every batch is
    split over the mesh's devices (``config.batch_size`` must be divisible by their number),
    BatchNorm uses the statistics of the whole batch, and the result equals the
    single-device run within float tolerance; the returned arrays are replicated on the mesh.
    """
    pool = check_indices(f"{desc}: the training index set", pool, images.num_examples, False)
    checks.key("key", key)
    per_epoch = steps_per_epoch(pool.size, config.batch_size)
    tx = make_optimizer(config, config.epochs * per_epoch, update_mask, per_epoch)
    params = variables["params"]
    state = TrainState(params, variables.get("batch_stats", {}), tx.init(params))
    runner = loop.make_runner(make_step(model, loss_fn, tx), mesh=mesh)
    loop_cfg = loop.LoopConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        steps_per_call=config.steps_per_call,
        progress=config.progress,
        desc=desc,
        checkpoint_every=config.checkpoint_every,
    )
    ckpt = checkpoint.Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    try:
        state, history = loop.run_epochs(
            runner, state, (images, aux), pool, key, loop_cfg, ckpt, mesh=mesh
        )
    finally:
        if ckpt is not None:
            ckpt.close()
    return state.variables, history


def _bind(out_dir: Path, model, config, key, pool, input_shape, metadata, pretrained,
          references) -> None:
    """Binds ``out_dir`` to this training request (``runs.RunDir``); speed-only settings
    (``runs.SPEED_FIELDS``) and the data folder may change."""
    request = {
        "model": runs.model_identity(model),
        "train_config": dataclasses.asdict(config),
        "key": runs.key_list(key),
        "pool": runs.digest(pool),
        "input_shape": list(input_shape),
        "pretrained": None if pretrained is None else str(pretrained),
        "references": references is not None,
        "metadata": dict(metadata or {}),
    }
    runs.RunDir(out_dir).open(request)  # the default ignores speed settings and data_dir


def reference_accuracies(model, variables, train: Images, test: Images, split,
                         mesh=None) -> dict:
    """theta_o's reference accuracies (percent, evaluation mode) used by adaptive beta and
    model selection: Acc_o(D_train), Acc_o(D_v) and Acc_o(D_t); data parallel over ``mesh``
    when given (``evaluation.outputs``)."""
    return evaluation.evaluate_sets(model, variables, {
        "train": (train, np.arange(train.num_examples)),
        "val": (test, split.val),
        "test": (test, split.test),
    }, mesh=mesh)


@runs.holds_folder("out_dir")
def train_model(
    model,
    images: Images,
    pool,
    config: TrainConfig,
    key: jax.Array,
    input_shape: tuple[int, ...],
    out_dir: str | os.PathLike,
    metadata: dict | None = None,
    desc: str = "train",
    pretrained: str | os.PathLike | None = None,
    mesh: Any = None,
    references: tuple[Images, Any] | None = None,
) -> tuple[dict, dict]:
    """Trains a fresh model on ``pool`` and saves it to ``out_dir`` (reused if already there).

    With ``references=(test_images, split)`` the model's reference accuracies
    (:func:`reference_accuracies`) are measured once and stored as ``metadata["refs"]``:
    theta_o keeps them for adaptive beta and model selection. ``pretrained`` names a local
    ``.npz`` of initial weights (``models.load_pretrained``; a classification head of another
    shape stays freshly initialised), e.g. for ViT.
    Returns (variables, metadata); metadata holds the history, wall-clock minutes (of every
    session, when an interrupted run was resumed from ``out_dir/progress``) and
    whatever the caller passed (config, split seed, ...).

    ``out_dir`` is bound to the request (``out_dir/run.json``: the config, key, pool, input
    shape, ``metadata`` and whether references are measured): asking a folder that holds
    (or is training) another model raises ValueError instead of returning that model.
    """
    from mcu_jax.models import init_variables, load_pretrained

    out_dir = Path(out_dir)
    _bind(out_dir, model, config, key, pool, input_shape, metadata, pretrained, references)
    if checkpoint.model_exists(out_dir):
        return checkpoint.load_model(out_dir)
    init_key, train_key = jax.random.split(key)
    variables = init_variables(model, init_key, input_shape)
    if pretrained is not None:
        variables = load_pretrained(variables, pretrained)
    earlier = loop.earlier_seconds(out_dir / "progress")  # sessions before a resume count too
    start = time.perf_counter()
    variables, history = fit(
        model, variables, images, pool, config, train_key,
        checkpoint_dir=out_dir / "progress", desc=desc, mesh=mesh,
    )
    meta = dict(metadata or {})
    meta.update(
        history=history,
        minutes=(earlier + time.perf_counter() - start) / 60.0,
        train_config=dataclasses.asdict(config),
    )
    if references is not None:
        meta["refs"] = reference_accuracies(model, variables, images, *references, mesh=mesh)
    checkpoint.save_model(out_dir, variables, meta)
    return variables, meta
