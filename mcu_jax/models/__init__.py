"""Flax Linen models for MCU, created by name: ``create(name, num_classes, **options)``.

Every model is a ``flax.linen.Module`` dataclass with fields ``num_classes``, ``dtype``
(compute dtype; parameters are always float32) and ``bn_momentum`` (running-average momentum
of all its BatchNorm layers, default 0.9), and is called as ``model.apply(variables, x,
train=...)`` on normalised float NHWC images, returning float32 logits. Variables are
``{"params": ..., "batch_stats": ...}`` (``batch_stats`` is ``{}`` without BatchNorm). The
BatchNorm models also have ``fold_bn`` (evaluation with BatchNorm folded into the
convolutions; :func:`folded` turns it on where it exists) and ``fused_bn`` (train-mode
BatchNorm + ReLU with a hand-written backward pass that moves fewer bytes, ``batchnorm.py``;
off until measured on a GPU; the same function either way, rounded differently).
PreResNet also has ``pointwise`` (its 1x1 convolutions as one kernel with the BatchNorm +
ReLU before them and the statistics after them, and a backward kernel, ``pointwise.py``;
:func:`with_pointwise` sets it where it exists; for training and the sweep), and with it
``conv3x3`` (its stride-1 3x3 convolutions as one kernel with bn2 + ReLU before them and
bn3's statistics after them, and a backward kernel, ``conv3x3.py``; :func:`with_conv3x3`;
for training and the sweep). With ``pointwise`` and ``fold_bn``, evaluation runs each
block's last 1x1 convolution and the next block's first as one kernel (``chain.py``).
Train-mode calls that use dropout need ``rngs={"dropout": key}``.

Built-in models (see each module's docstring):

- ``cnn_small``: small BN CNN for 8x8x1 digits (``cnn.py``);
- ``resnet20``: CIFAR ResNet-20, option-A shortcuts (``resnet.py``);
- ``preresnet110``: PreResNet-110 with bottlenecks, the paper's CIFAR model (``preresnet.py``);
- ``vgg16_bn``: 13-conv VGG-16-BN for 64x64 Tiny-ImageNet (``vgg.py``);
- ``vit_small`` (ViT-S/4, 32x32) and ``vit_b16`` (ViT-B/16, 224x224) (``vit.py``).

Add a model with ``@register("name")`` on a Module class or a factory
``f(num_classes, **options) -> Module``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcu_jax import checks, pytrees
from mcu_jax.models.cnn import CNNSmall
from mcu_jax.models.layers import COMPUTE_DTYPES, resolve_dtype
from mcu_jax.models.preresnet import (
    POINTWISE,
    PreResNet,
    check_conv3x3,
    flax_order_kernels,
    pointwise_impl,
    preresnet,
)
from mcu_jax.models.pretrained import load_pretrained, save_npz
from mcu_jax.models.resnet import CifarResNet
from mcu_jax.models.vgg import VGG16BN
from mcu_jax.models.vit import VisionTransformer, vit_b16, vit_small

__all__ = [
    "COMPUTE_DTYPES",
    "CNNSmall",
    "CifarResNet",
    "MODELS",
    "POINTWISE",
    "PreResNet",
    "VGG16BN",
    "VisionTransformer",
    "check_variables",
    "conv_filters",
    "count_params",
    "create",
    "folded",
    "init_variables",
    "kernel_dtypes",
    "load_pretrained",
    "pointwise_impl",
    "preresnet",
    "register",
    "save_npz",
    "variable_shapes",
    "with_conv3x3",
    "with_pointwise",
]

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory | None = None, *, overwrite: bool = False):
    """Register ``factory(num_classes=..., dtype=..., bn_momentum=..., **options)`` as ``name``.

    Use as ``register("name", Factory)`` or as a decorator ``@register("name")``; a Module
    class is a valid factory. Registering an existing name raises ValueError unless
    ``overwrite=True``. Returns the factory (so the decorator leaves it unchanged).
    """

    def add(f: Factory) -> Factory:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: got {name!r}, expected a non-empty string")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"name: model {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def __getattr__(attr: str) -> Any:
    # MODELS is computed on access so that it includes models registered later.
    if attr == "MODELS":
        return tuple(_REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def create(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build the model registered as ``name`` for ``num_classes`` classes.

    Options common to all models: ``dtype`` (compute dtype, ``jnp.float32`` default, or
    ``jnp.bfloat16``; the strings "float32"/"bfloat16" work too) and ``bn_momentum`` (float in
    [0, 1], default 0.9). Other options are fields of the model (e.g. ``depth`` for ViTs,
    ``shortcut`` for ``resnet20``, ``fused_bn`` (a bool) for the BatchNorm models,
    ``pointwise`` and ``conv3x3`` for PreResNet; ``fused_bn=False``, ``pointwise="conv"``
    and ``conv3x3="conv"``, every model's behaviour, are accepted by all). Raises ValueError
    for an unknown name (listing the known ones), a bad ``num_classes``/``dtype``/
    ``bn_momentum``/``fused_bn``/``pointwise``/``conv3x3``, a ``conv3x3`` kernel without the
    1x1 kernel, or an unknown option.
    """
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: got {num_classes!r}, expected a positive int")
    options["dtype"] = resolve_dtype(options.get("dtype", jnp.float32))
    momentum = options.get("bn_momentum", 0.9)
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise ValueError(f"bn_momentum: got {momentum!r}, expected a float in [0, 1]")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bn_momentum: got {momentum!r}, expected a float in [0, 1]")
    options["bn_momentum"] = float(momentum)
    if "fused_bn" in options:  # a bool, or older run records' model text would not match
        if not checks.flag("fused_bn", options["fused_bn"]):
            del options["fused_bn"]  # the default, and what models without BatchNorm do
    # "conv", the default, is what models without the field do
    for field in ("pointwise", "conv3x3"):
        if field in options:
            pointwise_impl(options[field], field)
            if options[field] == "conv":
                del options[field]
    check_conv3x3(options.get("pointwise", "conv"), options.get("conv3x3", "conv"))
    try:
        return _REGISTRY[name](num_classes=num_classes, **options)
    except TypeError as e:
        raise ValueError(f"options: model {name!r} rejected {sorted(options)}: {e}") from e


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or ``jax.ShapeDtypeStruct``s)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def conv_filters(model: nn.Module, params: Any) -> frozenset[str]:
    """The paths (``pytrees.flatten``'s) of ``params``' tensors that ``model`` runs as
    convolution filters (Flax's HWIO): its 4-d tensors, except PreResNet's kernels that its
    ``pointwise`` and ``conv3x3`` settings read in Flax's order
    (``preresnet.flax_order_kernels``). Curve training stores the filters in the order GPUs
    read them (``mcu.FILTER_ORDER``)."""
    flat = pytrees.flatten(params)
    kept = flax_order_kernels(model, flat) if isinstance(model, PreResNet) else frozenset()
    return frozenset(k for k, v in flat.items() if len(v.shape) == 4 and k not in kept)


def kernel_dtypes(model: nn.Module, params: Any) -> dict[str, jnp.dtype]:
    """Path (``pytrees.flatten``'s) -> ``model``'s compute dtype, for each of ``params``'
    kernels (leaves named "kernel": the weights of convolutions and dense layers, which
    every layer of this package's models casts to the compute dtype as it uses them; a
    bfloat16 model computes what it computes from float32 kernels, tested). Curve training
    forms the curve point's kernels in it, so that no cast runs after them (``mcu``); their
    gradients then come in the compute dtype (for PreResNet's 1x1 kernels, whose backward
    kernel sums the weight gradient in float32, that rounds it, as cuDNN's is for every
    other convolution). Empty for a model whose class does not declare ``casts_kernels =
    True`` (a ``ClassVar``: this package's models do; a registered model may compute with a
    kernel in float32) or that has no compute dtype: their kernels stay float32.
    """
    if not getattr(type(model), "casts_kernels", False) or getattr(model, "dtype", None) is None:
        return {}
    dtype = resolve_dtype(model.dtype)
    return {k: dtype for k in pytrees.flatten(params) if k.rsplit("/", 1)[-1] == "kernel"}


def check_variables(model: nn.Module, variables: Any, input_shape: Sequence[int],
                    name: str = "variables") -> None:
    """ValueError unless ``variables`` are ``model``'s: ``{"params", "batch_stats"}`` with the
    leaves, shapes and dtypes that :func:`init_variables` makes for ``input_shape`` (the first
    leaf that differs is named), all finite. Run before any work, so that another model's
    checkpoint, or a NaN, is refused up front with a clear message instead of a Flax scope
    error inside a trace or a NaN loss later."""
    if not isinstance(variables, dict) or "params" not in variables:
        got = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise ValueError(f"{name} must be a dict with 'params' and 'batch_stats', got {got}")
    expected = variable_shapes(model, input_shape)
    given = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    pytrees.check_compatible(**{f"the {type(model).__name__} model": expected, name: given})
    pytrees.check_finite(name, given)


def variable_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """The shapes and dtypes (``jax.ShapeDtypeStruct``) of :func:`init_variables`' result,
    without allocating it."""
    return jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), input_shape))


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Initialise ``model`` in eval mode on zeros of ``input_shape``.

    ``input_shape`` is (N, H, W, C) or (H, W, C) (a batch of one). Returns
    ``{"params": ..., "batch_stats": ...}`` with ``batch_stats == {}`` for models without
    BatchNorm. Wrap in ``jax.eval_shape`` to get shapes without allocating.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(
            f"input_shape: got {tuple(input_shape)}, expected (N, H, W, C) or (H, W, C)"
        )
    return _init_jit(model, key, shape)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_jit(model: nn.Module, key: jax.Array, shape: tuple[int, ...]) -> dict:
    # One compiled program instead of an eager random-number compile per parameter shape.
    params_key, dropout_key = jax.random.split(key)
    variables = model.init(
        {"params": params_key, "dropout": dropout_key}, jnp.zeros(shape, jnp.float32), train=False
    )
    return {
        "params": dict(variables["params"]),
        "batch_stats": dict(variables.get("batch_stats", {})),
    }


register("cnn_small", CNNSmall)
register("resnet20", functools.partial(CifarResNet, depth=20))
register("preresnet110", functools.partial(PreResNet, depth=110))
register("vgg16_bn", VGG16BN)
register("vit_small", vit_small)
register("vit_b16", vit_b16)


def folded(model):
    """``model`` evaluating with every foldable BatchNorm folded into its convolution (the
    built-in models' ``fold_bn`` field, ``models.layers.conv_bn``); a model without that
    field (no BatchNorm, or a user model) is returned as it is."""
    return _with_field(model, "fold_bn", True)


def with_pointwise(model, pointwise: str):
    """``model`` with its ``pointwise`` field set (PreResNet's 1x1 convolutions as
    ``pointwise.bn_relu_matmul``; one of :data:`POINTWISE`, checked); a model without that
    field is returned as it is."""
    pointwise_impl(pointwise)
    return _with_field(model, "pointwise", pointwise)


def with_conv3x3(model, conv3x3: str):
    """``model`` with its ``conv3x3`` field set (PreResNet's stride-1 3x3 convolutions as
    ``conv3x3.bn_relu_conv3x3``; one of :data:`POINTWISE`, checked); a
    model without that field is returned as it is. ValueError where the model's
    ``pointwise`` is "conv": the kernel reads the 1x1 kernel's output."""
    pointwise_impl(conv3x3, "conv3x3")
    if "conv3x3" not in getattr(model, "__dataclass_fields__", {}):
        return model
    check_conv3x3(model.pointwise, conv3x3)
    return model.clone(conv3x3=conv3x3)


def _with_field(model, name: str, value):
    """``model.clone(**{name: value})`` where the model has that field, else ``model``."""
    if name in getattr(model, "__dataclass_fields__", {}):
        return model.clone(**{name: value})
    return model
