"""Tests of mcu_jax.models: registry, parameter counts, forward passes, BatchNorm momentum,
bfloat16, jit/vmap and the npz weight round trip.

Big models are only traced (``jax.eval_shape``) or run on 2 tiny images with variables filled
from numpy, so nothing heavy (no random-init compilation of 100 layers) runs on the CPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcu_jax import models, pytrees
from mcu_jax.models import count_params, create, init_variables, load_pretrained, save_npz

# RBG keys: compiling threefry for every parameter shape dominates eager init time on CPU.
KEY = jax.random.key(0, impl="rbg")

# name -> (input shape (H, W, C), create options for a cheap forward pass)
INPUTS = {
    "cnn_small": ((8, 8, 1), {}),
    "resnet20": ((32, 32, 3), {}),
    "preresnet110": ((32, 32, 3), {}),
    "vgg16_bn": ((64, 64, 3), {}),
    "vit_small": ((32, 32, 3), {"depth": 2}),  # full widths, fewer (identical) blocks
    "vit_b16": ((32, 32, 3), {"depth": 1}),  # full ViT-B/16 at 224x224 is only traced
}
# classes per model in forward tests: as in the parameter-count tests, so traces are shared
CLASSES = {"vgg16_bn": 200}
BN_MODELS = ("cnn_small", "resnet20", "preresnet110", "vgg16_bn")
TINY_VIT = dict(hidden=32, depth=1, num_heads=2, mlp_dim=64)


@functools.cache
def variable_shapes(model, shape):
    """ShapeDtypeStructs of ``init_variables`` without running it (cached: tracing a
    110-layer model takes a while)."""
    return jax.eval_shape(lambda k: init_variables(model, k, shape), KEY)


@functools.cache
def fake_variables(model, shape, seed=0):
    """Variables of the right structure filled from numpy: cheap stand-ins for init.

    Kernels ~ N(0, 1/fan_in), biases small, BN scales ~1, running means small, running
    variances in [0.5, 1.5] (so momentum arithmetic on them is informative). Cached: callers
    must not mutate the result.
    """
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "var":
            a = rng.uniform(0.5, 1.5, s.shape)
        elif name == "scale":
            a = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif len(s.shape) >= 2:
            a = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        else:
            a = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, variable_shapes(model, shape))


# Tiny inputs make compile time dominate, and XLA's backend optimisations roughly double it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


@functools.cache
def _compiled(model, train):
    # One XLA compile per (model, mode): much cheaper on CPU than eager op-by-op dispatch,
    # which compiles every distinct primitive separately. Models are hashable dataclasses.
    if train:
        return jit(
            lambda v, x, key: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )
        )
    return jit(lambda v, x: model.apply(v, x, train=False))


def evaluate(model, v, x):
    """Eval-mode logits (jit-compiled)."""
    return _compiled(model, False)(v, x)


def train_call(model, v, x, key=KEY):
    """Train-mode (logits, new batch_stats) (jit-compiled)."""
    out, new = _compiled(model, True)(v, x, key)
    return out, new["batch_stats"]


def images(shape, n=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, *shape)), jnp.float32)


def leaves_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


# ----------------------------------------------------------------------------- registry


def test_builtin_names():
    assert set(models.MODELS) >= set(INPUTS)
    assert isinstance(models.MODELS, tuple)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        create("resnet1000", 10)
    for name in INPUTS:
        assert name in str(err.value)
    assert "resnet1000" in str(err.value)


def test_register_user_model():
    class Linear(nn.Module):
        num_classes: int
        dtype: object = jnp.float32
        bn_momentum: float = 0.9

        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1)).astype(jnp.float32)

    try:
        assert models.register("test_linear")(Linear) is Linear
        assert "test_linear" in models.MODELS
        model = create("test_linear", 3)
        v = init_variables(model, KEY, (4, 4, 1))
        assert v["batch_stats"] == {}
        assert count_params(v["params"]) == 16 * 3 + 3
        with pytest.raises(ValueError, match="already registered"):
            models.register("test_linear", Linear)
        models.register("test_linear", Linear, overwrite=True)
    finally:
        models._REGISTRY.pop("test_linear", None)
    assert "test_linear" not in models.MODELS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=10, dtype="int8"), "dtype"),
        (dict(num_classes=10, dtype=jnp.int32), "dtype"),
        (dict(num_classes=10, bn_momentum=1.5), "bn_momentum"),
        (dict(num_classes=10, no_such_option=1), "no_such_option"),
    ],
)
def test_bad_create_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create("cnn_small", **kwargs)


def test_common_fields_and_dtype_strings():
    for name in INPUTS:
        model = create(name, 10, dtype="bfloat16", bn_momentum=0.5)
        assert model.num_classes == 10
        assert model.dtype == jnp.bfloat16
        assert model.bn_momentum == 0.5
        assert model.clone(bn_momentum=0.0).bn_momentum == 0.0
        assert create(name, 10).dtype == jnp.float32


# ------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "name, num_classes, shape, options, expected",
    [
        ("cnn_small", 10, (8, 8, 1), {}, 29_162),
        # He et al. 2016: ResNet-20 "0.27M"; option A (parameter-free shortcuts)
        ("resnet20", 10, (32, 32, 3), {}, 269_722),
        ("resnet20", 10, (32, 32, 3), {"shortcut": "B"}, 272_474),
        # NOTES.md, exact
        ("preresnet110", 10, (32, 32, 3), {}, 1_146_842),
        ("preresnet110", 100, (32, 32, 3), {}, 1_169_972),
        # 14,714,688 (standard VGG-16 conv stack) + 8,448 BN + 1,414,344 classifier
        ("vgg16_bn", 200, (64, 64, 3), {}, 16_137_480),
        # ViT-S shape (DeiT-S: 22M at 224 with patch 16) with patch 4 at 32x32
        ("vit_small", 10, (32, 32, 3), {}, 21_342_346),
        # ViT-B/16: 86,567,656 (timm vit_base_patch16_224, 1000 classes)
        ("vit_b16", 1000, (224, 224, 3), {}, 86_567_656),
        ("vit_b16", 100, (224, 224, 3), {}, 85_875_556),
    ],
)
def test_parameter_counts(name, num_classes, shape, options, expected):
    v = variable_shapes(create(name, num_classes, **options), shape)
    n = count_params(v["params"])
    print(f"{name} ({num_classes} classes, {options}): {n:,} parameters")
    assert n == expected
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))


def test_count_params_on_arrays():
    tree = {"a": jnp.zeros((2, 3)), "b": [np.ones(4), jnp.zeros(())]}
    assert count_params(tree) == 11
    assert count_params({}) == 0


def test_preresnet110_structure():
    v = variable_shapes(create("preresnet110", 10), (32, 32, 3))["params"]
    blocks = [k for k in v if "_block" in k]
    assert len(blocks) == 36
    assert sorted(k for k in blocks if "shortcut" in v[k]) == [
        "stage1_block0",
        "stage2_block0",
        "stage3_block0",
    ]
    assert v["stage2_block0"]["shortcut"]["kernel"].shape == (1, 1, 64, 128)
    assert v["stem"]["kernel"].shape == (3, 3, 3, 16) and "bias" not in v["stem"]
    assert v["final_bn"]["scale"].shape == (256,)
    assert v["head"]["kernel"].shape == (256, 10) and v["head"]["bias"].shape == (10,)
    biases = [p for p, _ in jax.tree_util.tree_leaves_with_path(v) if p[-1].key == "bias"]
    assert all(p[0].key == "head" or "bn" in p[-2].key for p in biases)


def test_preresnet_generic_depth():
    # PreResNet-164 (bottleneck): 1.70M parameters (He et al. 2016b)
    n = count_params(variable_shapes(models.preresnet(164, 10), (32, 32, 3))["params"])
    assert 1.69e6 < n < 1.71e6
    with pytest.raises(ValueError, match="depth"):
        models.preresnet(21, 10)


def test_vgg16_bn_has_13_convs_and_13_batchnorms():
    v = variable_shapes(create("vgg16_bn", 200), (64, 64, 3))
    p = v["params"]
    convs = [k for k, m in p.items() if "kernel" in m and m["kernel"].ndim == 4]
    assert len(convs) == 13
    assert all("bias" in p[k] for k in convs)
    assert len(v["batch_stats"]) == 13
    assert [p[f"conv{i}"]["kernel"].shape[-1] for i in range(13)] == (
        [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    )
    assert p["fc1"]["kernel"].shape == (2048, 512)
    assert p["fc2"]["kernel"].shape == (512, 512)
    assert p["head"]["kernel"].shape == (512, 200)


def test_vit_b16_full_forward_traced():
    model = create("vit_b16", 1000)
    v = variable_shapes(model, (224, 224, 3))
    assert v["batch_stats"] == {}
    p = v["params"]
    assert p["cls"].shape == (1, 1, 768)
    assert p["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    assert len([k for k in p["Transformer"] if k.startswith("encoderblock_")]) == 12
    attn = p["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
    assert attn["query"]["kernel"].shape == (768, 12, 64)
    assert p["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"].shape == (
        768,
        3072,
    )
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False),
        v,
        jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
    )
    assert out.shape == (2, 1000) and out.dtype == jnp.float32


# ------------------------------------------------------------------------- forward passes


@pytest.mark.parametrize("name", list(INPUTS))
def test_forward_shapes_and_dtype(name):
    shape, options = INPUTS[name]
    n = CLASSES.get(name, 10)
    model = create(name, n, **options)
    v = fake_variables(model, shape)
    x = images(shape)
    out = evaluate(model, v, x)
    assert out.shape == (2, n) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    out_t, new = train_call(model, v, x)
    assert out_t.shape == (2, n) and out_t.dtype == jnp.float32
    assert np.isfinite(np.asarray(out_t)).all()
    assert jax.tree.structure(new) == jax.tree.structure(v["batch_stats"])
    if name in BN_MODELS:
        # batch statistics in train mode vs running statistics in eval mode
        assert not np.allclose(np.asarray(out), np.asarray(out_t), atol=1e-3)
        assert not jax.tree.all(jax.tree.map(jnp.array_equal, new, v["batch_stats"]))
    else:
        # ViTs have no BN and no dropout by default: train == eval
        np.testing.assert_allclose(np.asarray(out), np.asarray(out_t), rtol=1e-5, atol=1e-5)


def test_vgg_dropout_uses_dropout_rng():
    model = create("vgg16_bn", 5)
    v = fake_variables(model, (32, 32, 3))
    x = images((32, 32, 3))

    def run(seed):
        return np.asarray(train_call(model, v, x, jax.random.key(seed))[0])

    assert np.array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))
    with pytest.raises(Exception, match="dropout"):  # no "dropout" rng: traced only
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), v, x)


def test_resnet_option_b_runs():
    model = create("resnet20", 4, shortcut="B")
    v = fake_variables(model, (32, 32, 3))
    assert "proj" in v["params"]["stage2_block0"]
    out = evaluate(model, v, images((32, 32, 3)))
    assert out.shape == (2, 4)


# -------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", list(INPUTS))
def test_bfloat16_keeps_float32_params_traced(name):
    shape, options = INPUTS[name]
    model = create(name, CLASSES.get(name, 10), dtype=jnp.bfloat16, **options)
    v = variable_shapes(model, shape)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False),
        v,
        jax.ShapeDtypeStruct((2, *shape), jnp.float32),
    )
    assert out.dtype == jnp.float32


@pytest.mark.parametrize(
    "name, shape, options",
    [
        ("cnn_small", (8, 8, 1), {}),
        ("resnet20", (32, 32, 3), {}),
        ("vit_small", (32, 32, 3), TINY_VIT),
    ],
)
def test_bfloat16_forward_finite(name, shape, options):
    model = create(name, 10, dtype="bfloat16", **options)
    v = fake_variables(model, shape)
    x = images(shape)
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(v, x))
    assert "bf16" in jaxpr  # computation really runs in bfloat16
    out = evaluate(model, v, x)
    assert out.dtype == jnp.float32 and out.shape == (2, 10)
    assert np.isfinite(np.asarray(out)).all()
    ref = evaluate(create(name, 10, **options), v, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0.1, atol=0.1)
    if name in BN_MODELS:
        _, new = train_call(model, v, x)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))


# --------------------------------------------------------------------- BatchNorm momentum


def _conv3x3_same(x, kernel):
    """Independent numpy 3x3 convolution with zero padding 1, NHWC x HWIO."""
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]), np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, i : i + h, j : j + w, :], kernel[i, j])
    return out


def test_bn_momentum_zero_writes_exact_batch_statistics():
    model = create("cnn_small", 10)
    v = fake_variables(model, (8, 8, 1))  # random running statistics, so blending shows
    x = images((8, 8, 1), n=16, seed=3)
    _, new = train_call(model.clone(bn_momentum=0.0), v, x)
    kernel = np.asarray(v["params"]["conv0"]["kernel"], np.float64)
    first = _conv3x3_same(np.asarray(x, np.float64), kernel)  # conv0 has no bias
    mean, var = first.mean(axis=(0, 1, 2)), first.var(axis=(0, 1, 2))  # biased variance
    close = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["bn0"]["mean"]), mean, **close)
    np.testing.assert_allclose(np.asarray(new["bn0"]["var"]), var, **close)
    # the default momentum 0.9 blends: 0.9 * old + 0.1 * batch
    _, blended = train_call(model, v, x)
    old = {k: np.asarray(a) for k, a in v["batch_stats"]["bn0"].items()}
    np.testing.assert_allclose(blended["bn0"]["mean"], 0.9 * old["mean"] + 0.1 * mean, **close)
    np.testing.assert_allclose(blended["bn0"]["var"], 0.9 * old["var"] + 0.1 * var, **close)
    # running statistics are not touched in eval mode
    _, same = jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))(v, x)
    leaves_close(same["batch_stats"], v["batch_stats"], rtol=0, atol=0)


#: Every built-in BatchNorm model, small: (name, input shape, create options).
BN_MODEL_CASES = [
    ("cnn_small", (8, 8, 1), {}),
    ("resnet20", (32, 32, 3), {"depth": 8, "shortcut": "B"}),
    ("preresnet110", (32, 32, 3), {"depth": 11}),
    ("vgg16_bn", (32, 32, 3), {}),
]


@pytest.mark.parametrize("name, shape, options", BN_MODEL_CASES)
def test_bn_momentum_reaches_every_batchnorm(name, shape, options):
    # Train mode normalises with batch statistics, so activations do not depend on the
    # momentum; hence stats(m) == m * old + (1 - m) * stats(0) in EVERY BN iff every BN
    # uses the model's momentum (here the default m = 0.9).
    base = create(name, 5, **options)
    v = fake_variables(base, shape)
    x = images(shape)
    exact = train_call(base.clone(bn_momentum=0.0), v, x)[1]
    blended = train_call(base, v, x)[1]
    expected = jax.tree.map(lambda o, e: 0.9 * o + 0.1 * e, v["batch_stats"], exact)
    leaves_close(blended, expected, rtol=1e-5, atol=1e-5)
    # momentum 0: the result does not depend on the old running statistics at all
    v2 = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a * 3.0, v["batch_stats"])}
    again = train_call(base.clone(bn_momentum=0.0), v2, x)[1]
    leaves_close(again, exact, rtol=1e-6, atol=1e-6)
    # create(..., bn_momentum=0.0) is the same model as the clone
    assert create(name, 5, bn_momentum=0.0, **options) == base.clone(bn_momentum=0.0)


# ------------------------------------------------------------------ BatchNorm folding


@pytest.mark.parametrize(
    "name, shape, options",
    [
        ("cnn_small", (8, 8, 1), {}),
        ("resnet20", (32, 32, 3), {"depth": 8, "shortcut": "B"}),  # proj + proj_bn folded too
        ("resnet20", (32, 32, 3), {"depth": 8}),
        ("preresnet110", (32, 32, 3), {"depth": 11}),
        ("vgg16_bn", (32, 32, 3), {}),  # conv biases folded with the BN shift
    ],
)
def test_folded_batchnorm_is_the_same_function(name, shape, options):
    """Evaluation with BN folded into the convolutions (``models.folded``) equals the plain
    evaluation up to float rounding; train mode and the variables are untouched."""
    base = create(name, 5, **options)
    fold = models.folded(base)
    assert fold.fold_bn and not base.fold_bn
    v = fake_variables(base, shape)
    x = images(shape)
    plain, folded = evaluate(base, v, x), evaluate(fold, v, x)
    assert not np.allclose(plain, 0)
    np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-4 * float(np.abs(plain).max()))
    # The folding uses the running statistics: other statistics, other (matching) logits.
    v2 = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a * 1.5,
                                                             v["batch_stats"])}
    plain2 = evaluate(base, v2, x)
    assert not np.allclose(plain2, plain, atol=1e-3)
    np.testing.assert_allclose(evaluate(fold, v2, x), plain2, rtol=1e-4,
                               atol=1e-4 * float(np.abs(plain2).max()))
    for a, b in zip(train_call(base, v, x), train_call(fold, v, x), strict=True):
        leaves_close(a, b, rtol=0, atol=0)
    assert variable_shapes(fold, shape) == variable_shapes(base, shape)


def param_grads(model, v, x):
    """Gradients in the params of a train-mode cross-entropy over ``x`` (labels i % 5)."""
    y = jnp.arange(x.shape[0]) % 5

    def loss(p):
        logits, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"], rngs={"dropout": KEY})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])

    return jax.jit(jax.grad(loss))(v["params"])


def test_fused_batchnorm_in_bfloat16_rounds_no_worse():
    """In bfloat16 both BatchNorms round: the fused one's gradients are no further from the
    float32 gradients than autodiff's."""
    shape = (32, 32, 3)
    reference = create("preresnet110", 5, depth=11)
    v, x = fake_variables(reference, shape), images(shape, n=4)

    def flat(grads):
        return np.concatenate([np.ravel(np.asarray(a, np.float64))
                               for a in jax.tree.leaves(grads)])

    want = flat(param_grads(reference, v, x))

    def error(fused_bn):
        model = create("preresnet110", 5, depth=11, dtype="bfloat16", fused_bn=fused_bn)
        return np.linalg.norm(flat(param_grads(model, v, x)) - want) / np.linalg.norm(want)

    plain, fused = error(False), error(True)
    assert 0 < plain < 0.1 and fused <= 1.5 * plain, (plain, fused)


@pytest.mark.parametrize("name, shape, options", BN_MODEL_CASES)
def test_fused_batchnorm_is_the_same_function(name, shape, options):
    """``fused_bn`` (BatchNorm + ReLU with the hand-written backward pass) changes neither
    the variables nor the function: the same logits and running statistics, and the same
    gradients within float rounding; evaluation mode is untouched."""
    base = create(name, 5, **options)
    fused = create(name, 5, fused_bn=True, **options)
    assert fused.fused_bn and not base.fused_bn
    assert variable_shapes(fused, shape) == variable_shapes(base, shape)
    v = fake_variables(base, shape)
    x = images(shape, n=4)
    np.testing.assert_array_equal(evaluate(fused, v, x), evaluate(base, v, x))
    (out_b, stats_b), (out_f, stats_f) = train_call(base, v, x), train_call(fused, v, x)
    np.testing.assert_allclose(out_f, out_b, rtol=1e-4, atol=1e-4)
    leaves_close(stats_f, stats_b, rtol=1e-4, atol=1e-5)
    g_b, g_f = param_grads(base, v, x), param_grads(fused, v, x)
    # Against the largest gradient: some are 0 up to rounding (a conv bias before a BN).
    atol = 1e-4 * max(float(np.abs(b).max()) for b in jax.tree.leaves(g_b))
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=atol)


def test_fused_batchnorm_in_the_problem_and_the_run_records():
    """ProblemConfig.fused_bn builds the model with it (BatchNorm models only); a record
    made before the field existed still matches the default model."""
    from mcu_jax import runs
    from mcu_jax.problem import ProblemConfig

    with pytest.raises(ValueError, match="fused_bn must be True or False, got 'yes'"):
        ProblemConfig(fused_bn="yes")
    with pytest.raises(ValueError, match="fused_bn"):
        create("vit_small", 5, fused_bn=True, **TINY_VIT)
    # refused by the config itself, before any data set is loaded
    with pytest.raises(ValueError, match="fused_bn: model 'vit_small' has no fused BatchNorm"):
        ProblemConfig(model="vit_small", fused_bn=True)
    assert ProblemConfig(model="resnet20", fused_bn=True).fused_bn
    with pytest.raises(ValueError, match="fused_bn must be True or False, got 0"):
        create("resnet20", 5, fused_bn=0)
    base, fused = create("resnet20", 10), create("resnet20", 10, fused_bn=True)
    assert "fused_bn" not in runs.model_identity(base)  # as in older records
    assert "fused_bn = True" in runs.model_identity(fused)
    assert runs.first_difference({"problem": {"dtype": "float32"}},
                                 {"problem": {"dtype": "float32", "fused_bn": False}}) is None
    assert runs.first_difference({"problem": {"dtype": "float32"}},
                                 {"problem": {"dtype": "float32", "fused_bn": True}}) is not None


def test_folded_leaves_models_without_the_field_alone():
    vit = create("vit_small", 5, **TINY_VIT)
    assert models.folded(vit) is vit


# ----------------------------------------------------------------------------- jit / vmap


@pytest.mark.parametrize(
    "name, shape, options",
    [
        ("cnn_small", (8, 8, 1), {}),
        ("preresnet110", (32, 32, 3), {"depth": 11}),
        ("vit_small", (32, 32, 3), TINY_VIT),
    ],
)
def test_jit_and_vmap_over_parameters(name, shape, options):
    model = create(name, 6, **options)
    members = [fake_variables(model, shape, seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    x = images(shape)

    @jit
    def ensemble(variables, x):
        return jax.vmap(lambda v: model.apply(v, x, train=False))(variables)

    out = ensemble(stacked, x)
    assert out.shape == (3, 2, 6) and out.dtype == jnp.float32
    for i, v in enumerate(members):
        np.testing.assert_allclose(out[i], evaluate(model, v, x), rtol=1e-4, atol=1e-4)

    @jit
    def train_stats(variables, x):
        def one(v):
            return model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]

        return jax.vmap(one)(variables)

    new = train_stats(stacked, x)
    assert jax.tree.structure(new) == jax.tree.structure(stacked["batch_stats"])
    for leaf in jax.tree.leaves(new):  # member i's statistics come from member i's params
        assert leaf.shape[0] == 3 and not np.allclose(leaf[0], leaf[1])


# ---------------------------------------------------------------------- init_variables


def test_init_variables():
    model = create("cnn_small", 10)
    v = init_variables(model, KEY, (8, 8, 1))
    assert set(v) == {"params", "batch_stats"}
    assert set(v["batch_stats"]) == {"bn0", "bn1"}
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["bn0"]["mean"]), 0.0)
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["bn0"]["var"]), 1.0)
    again = init_variables(model, KEY, (4, 8, 8, 1))  # batch size does not matter
    leaves_close(v, again, rtol=0, atol=0)
    other = init_variables(model, jax.random.key(1, impl="rbg"), (8, 8, 1))
    assert not np.array_equal(
        np.asarray(v["params"]["conv0"]["kernel"]), np.asarray(other["params"]["conv0"]["kernel"])
    )
    vit = variable_shapes(create("vit_small", 10, **TINY_VIT), (32, 32, 3))
    assert set(vit) == {"params", "batch_stats"} and vit["batch_stats"] == {}
    bf = variable_shapes(create("cnn_small", 10, dtype="bfloat16"), (8, 8, 1))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf))
    with pytest.raises(ValueError, match="input_shape"):
        init_variables(model, KEY, (8, 8))


# ------------------------------------------------------------------------- npz weights


def test_save_load_round_trip_with_batch_stats(tmp_path):
    model = create("cnn_small", 10)
    saved = fake_variables(model, (8, 8, 1), seed=5)
    path = tmp_path / "weights"  # no suffix: must be written exactly here
    save_npz(saved, path)
    assert path.is_file()
    with np.load(path) as f:
        assert "params/conv0/kernel" in f.files and "batch_stats/bn0/var" in f.files
    fresh = init_variables(model, KEY, (8, 8, 1))
    loaded = load_pretrained(fresh, path)
    assert jax.tree.structure(loaded) == jax.tree.structure(fresh)
    leaves_close(loaded, saved, rtol=0, atol=0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded))


def test_load_pretrained_skips_mismatching_head(tmp_path):
    src = fake_variables(create("vit_small", 10, **TINY_VIT), (32, 32, 3), seed=7)
    path = tmp_path / "vit.npz"
    save_npz(src, path)
    target = fake_variables(create("vit_small", 4, **TINY_VIT), (32, 32, 3))
    loaded = load_pretrained(target, path)
    leaves_close(loaded["params"]["head"], target["params"]["head"], rtol=0, atol=0)
    rest = {k: v for k, v in loaded["params"].items() if k != "head"}
    leaves_close(rest, {k: v for k, v in src["params"].items() if k != "head"}, rtol=0, atol=0)
    assert loaded["batch_stats"] == {}
    # same number of classes: the head is loaded too
    same = load_pretrained(fake_variables(create("vit_small", 10, **TINY_VIT), (32, 32, 3)), path)
    leaves_close(same, src, rtol=0, atol=0)


def test_load_pretrained_casts_to_the_models_dtypes(tmp_path):
    """Weights stored in float16 or float64 (common in exported checkpoints) come back in the
    model's float32, with the stored values."""
    src = fake_variables(create("vit_small", 10, **TINY_VIT), (32, 32, 3), seed=3)
    for dtype in (np.float16, np.float64):
        path = tmp_path / f"w_{np.dtype(dtype).name}.npz"
        save_npz(jax.tree.map(lambda a, d=dtype: np.asarray(a, d), src), path)
        loaded = load_pretrained(fake_variables(create("vit_small", 10, **TINY_VIT),
                                                (32, 32, 3)), path)
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(src), strict=True):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(np.asarray(got),
                                          np.asarray(want).astype(dtype).astype(np.float32))


def test_load_pretrained_errors(tmp_path):
    path = tmp_path / "vit.npz"
    save_npz(fake_variables(create("vit_small", 10, **TINY_VIT), (32, 32, 3)), path)
    deeper = fake_variables(create("vit_small", 10, **{**TINY_VIT, "depth": 2}), (32, 32, 3))
    with pytest.raises(ValueError, match="missing key 'params/Transformer/encoderblock_1/"):
        load_pretrained(deeper, path)
    wider = fake_variables(create("vit_small", 10, **{**TINY_VIT, "mlp_dim": 48}), (32, 32, 3))
    with pytest.raises(ValueError, match=r"MlpBlock_3/Dense_0/(bias|kernel)' has shape"):
        load_pretrained(wider, path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(deeper, tmp_path / "nope.npz")


def test_load_pretrained_accepts_vit_jax_style_keys(tmp_path):
    # vit_jax checkpoints store params without the "params/" prefix, plus unused extras
    src = fake_variables(create("vit_small", 10, **TINY_VIT), (32, 32, 3), seed=3)
    flat = {k.removeprefix("params/"): v for k, v in np.load(_saved(src, tmp_path)).items()}
    flat["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    path = tmp_path / "vit_jax_style.npz"
    np.savez(path, **flat)
    target = fake_variables(create("vit_small", 10, **TINY_VIT), (32, 32, 3))
    leaves_close(load_pretrained(target, path), src, rtol=0, atol=0)


def _saved(variables, tmp_path):
    path = tmp_path / "tmp.npz"
    save_npz(variables, path)
    return path


# ------------------------------------------- what the models compute (numpy references)
#
# Every reference below is written from the architecture specs (NOTES.md, the module
# docstrings) in float64 numpy, with the constants spelled out (BN epsilon 1e-5, LayerNorm
# epsilon 1e-6, padding kernel // 2 on every side), not read back from mcu_jax.


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _relu(a):
    return np.maximum(a, 0.0)


def _np_conv(x, kernel, stride=1):
    """k x k convolution, zero padding k // 2 on EVERY side (PyTorch style), NHWC x HWIO."""
    k = kernel.shape[0]
    pad = k // 2
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((n, ho, wo, kernel.shape[-1]), np.float64)
    for i in range(k):
        for j in range(k):
            rows = slice(i, i + stride * (ho - 1) + 1, stride)
            cols = slice(j, j + stride * (wo - 1) + 1, stride)
            out += xp[:, rows, cols, :] @ kernel[i, j]
    return out


def _np_bn(x, v, *path, eps=1e-5):
    """Eval-mode BatchNorm with the running statistics at ``path`` (PyTorch's eps 1e-5)."""
    p, s = v["params"], v["batch_stats"]
    for k in path:
        p, s = p[k], s[k]
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _np_preresnet(v, x):
    """PreResNet (bottleneck, pre-activation) as in NOTES.md, eval mode."""
    p = v["params"]
    x = _np_conv(x, p["stem"]["kernel"])
    n = len([k for k in p if k.startswith("stage1_block")])
    for s, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2), strict=True)):
        for b in range(n):
            name, st = f"stage{s + 1}_block{b}", stride if b == 0 else 1
            q = p[name]
            out = _relu(_np_bn(x, v, name, "bn1"))
            out = _relu(_np_bn(_np_conv(out, q["conv1"]["kernel"]), v, name, "bn2"))
            out = _relu(_np_bn(_np_conv(out, q["conv2"]["kernel"], st), v, name, "bn3"))
            out = _np_conv(out, q["conv3"]["kernel"])
            assert out.shape[-1] == 4 * planes
            assert ("shortcut" in q) == (b == 0)  # projection in each stage's first block
            # the projection reads the block's RAW input, not the pre-activated one
            x = out + (_np_conv(x, q["shortcut"]["kernel"], st) if b == 0 else x)
    x = _relu(_np_bn(x, v, "final_bn")).mean(axis=(1, 2))  # head: BN-ReLU-pool-linear
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def _np_resnet(v, x):
    """CIFAR ResNet with option-A shortcuts (He et al. 2016, section 4.2), eval mode."""
    p = v["params"]
    x = _relu(_np_bn(_np_conv(x, p["stem"]["kernel"]), v, "stem_bn"))
    n = len([k for k in p if k.startswith("stage1_block")])
    for s, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2), strict=True)):
        for b in range(n):
            name, st = f"stage{s + 1}_block{b}", stride if b == 0 else 1
            q = p[name]
            out = _relu(_np_bn(_np_conv(x, q["conv1"]["kernel"], st), v, name, "bn1"))
            out = _np_bn(_np_conv(out, q["conv2"]["kernel"]), v, name, "bn2")
            c = x.shape[-1]
            if st != 1 or c != planes:
                # option A: pixels (0, 0), (0, s), ... and planes // 4 zero channels per side
                residual = np.zeros(out.shape)
                residual[..., planes // 4 : planes // 4 + c] = x[:, ::st, ::st, :]
            else:
                residual = x
            x = _relu(out + residual)  # ReLU after the sum
    x = x.mean(axis=(1, 2))
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def _np_vgg16_bn(v, x):
    """VGG-16-BN as in NOTES.md, eval mode (dropout off)."""
    p = v["params"]
    layer = 0
    for block in ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3):
        for _ in block:
            c = p[f"conv{layer}"]
            x = _relu(_np_bn(_np_conv(x, c["kernel"]) + c["bias"], v, f"bn{layer}"))
            layer += 1
        n, h, w, ch = x.shape  # 2x2 max-pool, stride 2
        x = x.reshape(n, h // 2, 2, w // 2, 2, ch).max(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    x = _relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    x = _relu(x @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def _np_layer_norm(x, p, eps=1e-6):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_vit(v, x, patch, ln_eps=1e-6):
    """ViT: patch embedding, class token first, position embeddings, pre-LN blocks
    x + MHSA(LN(x)), x + MLP(LN(x)) (tanh GELU), final LN, linear head on the class token."""
    p = v["params"]
    t = p["Transformer"]
    n, h, w, c = x.shape
    patches = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (h // patch) * (w // patch), patch * patch * c)
    emb = p["embedding"]["kernel"]
    tokens = patches @ emb.reshape(-1, emb.shape[-1]) + p["embedding"]["bias"]
    cls = np.broadcast_to(p["cls"], (n, 1, tokens.shape[-1]))
    x = np.concatenate([cls, tokens], axis=1) + t["posembed_input"]["pos_embedding"]
    depth = len([k for k in t if k.startswith("encoderblock_")])
    for i in range(depth):
        blk = t[f"encoderblock_{i}"]
        a = blk["MultiHeadDotProductAttention_1"]
        y = _np_layer_norm(x, blk["LayerNorm_0"], ln_eps)
        q, k, val = (
            np.einsum("ntd,dhk->nthk", y, a[m]["kernel"]) + a[m]["bias"]
            for m in ("query", "key", "value")
        )
        logits = np.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads = np.einsum("nhqs,nshk->nqhk", weights, val)
        x = x + np.einsum("nqhk,hkd->nqd", heads, a["out"]["kernel"]) + a["out"]["bias"]
        mlp = blk["MlpBlock_3"]
        y = _np_layer_norm(x, blk["LayerNorm_2"], ln_eps)
        y = _np_gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
        x = x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    x = _np_layer_norm(x, t["encoder_norm"], ln_eps)
    return x[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]


def _assert_logits_match(got, ref, rtol=1e-4):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape and np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@pytest.mark.parametrize(
    "name, shape, options, reference",
    [
        ("preresnet110", (32, 32, 3), {"depth": 11}, _np_preresnet),
        ("resnet20", (32, 32, 3), {"depth": 8}, _np_resnet),  # option A shortcuts
        ("vgg16_bn", (32, 32, 3), {}, _np_vgg16_bn),
    ],
)
def test_cnn_logits_match_numpy_reference(name, shape, options, reference):
    """Eval-mode logits of the BN CNNs equal a numpy forward pass written from the spec
    (same model, variables and images as the folding test, so its compilation is reused)."""
    model = create(name, 5, **options)
    v = fake_variables(model, shape)
    x = images(shape)
    _assert_logits_match(evaluate(model, v, x), reference(_f64(v), np.asarray(x, np.float64)))


def test_preresnet_stage_shapes():
    # 32x32 input: stem 32x32x16; stages 32x32x64, 16x16x128, 8x8x256 (strides 1, 2, 2)
    model = create("preresnet110", 5, depth=11)
    v = variable_shapes(model, (32, 32, 3))
    _, state = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        ),
        v,
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
    )
    inter = state["intermediates"]
    assert inter["stem"]["__call__"][0].shape == (2, 32, 32, 16)
    assert inter["stage1_block0"]["__call__"][0].shape == (2, 32, 32, 64)
    assert inter["stage2_block0"]["__call__"][0].shape == (2, 16, 16, 128)
    assert inter["stage3_block0"]["__call__"][0].shape == (2, 8, 8, 256)
    assert inter["final_bn"]["__call__"][0].shape == (2, 8, 8, 256)


def test_vit_logits_match_numpy_reference():
    """A depth-1 tiny ViT equals a numpy pre-LN ViT, also with tokens of variance ~1e-6, where
    the LayerNorm epsilon (1e-6, as in vit_jax) changes the normalised values a lot."""
    model = create("vit_small", 5, **TINY_VIT)
    v = fake_variables(model, (32, 32, 3))
    x = images((32, 32, 3))
    xs = np.asarray(x, np.float64)
    _assert_logits_match(evaluate(model, v, x), _np_vit(_f64(v), xs, patch=4))
    p, t = v["params"], v["params"]["Transformer"]
    tiny = {
        "params": {
            **p,
            "cls": p["cls"] * 1e-3,
            "embedding": jax.tree.map(lambda a: a * 1e-3, p["embedding"]),
            "Transformer": {
                **t,
                "posembed_input": {
                    "pos_embedding": t["posembed_input"]["pos_embedding"] * 1e-3
                },
            },
        },
        "batch_stats": {},
    }
    ref = _np_vit(_f64(tiny), xs, patch=4)
    _assert_logits_match(evaluate(model, tiny, x), ref, rtol=1e-3)
    # the test is sensitive to the epsilon: 1e-5 would give visibly different logits
    assert not np.allclose(
        ref, _np_vit(_f64(tiny), xs, patch=4, ln_eps=1e-5), rtol=1e-2, atol=1e-2 * np.abs(ref).max()
    )


@pytest.mark.parametrize("kernel, stride", [(3, 2), (3, 1), (1, 2)])
def test_conv_pads_kernel_half_on_every_side(kernel, stride):
    # A stride-2 3x3 conv on an even input samples differently with padding 1 on every side
    # (PyTorch, the reference models) than with "SAME" (0 before, 1 after).
    from mcu_jax.models import layers

    rng = np.random.default_rng(11)
    k = rng.standard_normal((kernel, kernel, 3, 5))
    x = rng.standard_normal((2, 8, 8, 3))
    layer = layers.conv(5, kernel, stride, dtype=jnp.float32)
    got = layer.apply({"params": {"kernel": jnp.asarray(k, jnp.float32)}},
                      jnp.asarray(x, jnp.float32))
    ref = _np_conv(x, k, stride)
    assert got.shape == ref.shape == (2, 8 // stride, 8 // stride, 5)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def _bn_variables(var):
    c = len(var)
    rng = np.random.default_rng(12)
    return {
        "params": {"scale": 1.0 + 0.1 * rng.standard_normal(c), "bias": rng.standard_normal(c)},
        "batch_stats": {"mean": 0.1 * rng.standard_normal(c), "var": np.asarray(var)},
    }


def test_batch_norm_epsilon_is_pytorch_default():
    """Eval mode: (x - mean) / sqrt(var + 1e-5) * scale + bias; train mode uses the biased
    batch variance with the same epsilon. Tiny variances make the epsilon matter."""
    from mcu_jax.models import layers

    v = _bn_variables([0.0, 1e-6, 1e-5, 1e-4, 1.0])
    rng = np.random.default_rng(13)
    x = v["batch_stats"]["mean"] + 1e-3 * rng.standard_normal((4, 3, 3, 5))
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v)
    bn = layers.batch_norm(False, 0.9, dtype=jnp.float32)
    got = bn.apply(f32, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), _np_bn(x, v), rtol=1e-4, atol=1e-4)
    got, _ = layers.batch_norm(True, 0.9, dtype=jnp.float32).apply(
        f32, jnp.asarray(x, jnp.float32), mutable=["batch_stats"]
    )
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # spread ~1e-3: var ~1e-6
    ref = (x - mean) / np.sqrt(var + 1e-5) * v["params"]["scale"] + v["params"]["bias"]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-3, atol=1e-3)


class _ConvBN(nn.Module):
    fold: bool

    @nn.compact
    def __call__(self, x):
        from mcu_jax.models import layers

        return layers.conv_bn(
            layers.conv(5, 3, dtype=jnp.float32, use_bias=True, name="conv"),
            layers.batch_norm(False, 0.9, dtype=jnp.float32, name="bn"),
            x,
            self.fold,
        )


def test_conv_bn_folding_keeps_the_epsilon():
    # Running variances 0 and 1e-6: folding with rsqrt(var) instead of rsqrt(var + eps)
    # would give inf / a ~3x too large scale there.
    rng = np.random.default_rng(14)
    bn = _bn_variables([0.0, 1e-6, 1e-3, 0.5, 2.0])
    v = {
        "params": {
            "conv": {"kernel": rng.standard_normal((3, 3, 3, 5)), "bias": rng.standard_normal(5)},
            "bn": bn["params"],
        },
        "batch_stats": {"bn": bn["batch_stats"]},
    }
    x = rng.standard_normal((2, 6, 6, 3))
    ref = _np_bn(_np_conv(x, v["params"]["conv"]["kernel"]) + v["params"]["conv"]["bias"], v, "bn")
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v)
    for fold in (False, True):
        got = jit(_ConvBN(fold).apply)(f32, jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_conv_init_is_he_normal_fan_out():
    # N(0, 2 / (k * k * out_channels)): for PreResNet's 3 -> 16 3x3 stem std sqrt(2 / 144)
    # = 0.118 (fan-in would give sqrt(2 / 27) = 0.272); checked on a larger conv as well.
    from mcu_jax.models import layers

    for cin, cout, n in ((3, 16, 8), (64, 256, 1)):
        layer = layers.conv(cout, 3, dtype=jnp.float32)
        keys = jax.random.split(KEY, n)
        init = jit(jax.vmap(lambda k: layer.init(k, jnp.zeros((1, 4, 4, cin)))))  # noqa: B023
        std = float(np.std(np.asarray(init(keys)["params"]["kernel"])))
        expected = np.sqrt(2.0 / (9 * cout))
        assert abs(std / expected - 1) < 0.1, (cin, cout, std, expected)


@pytest.mark.parametrize("name, shape, options", [
    *((name, shape, {"depth": 11} if name == "preresnet110" else options)
      for name, (shape, options) in INPUTS.items()),
    ("preresnet110", (32, 32, 3), {"depth": 11, "pointwise": "fused"}),
    # two blocks a stage: stride-1 3x3 convolutions in every stage
    ("preresnet110", (32, 32, 3), {"depth": 20, "pointwise": "fused", "conv3x3": "fused"}),
])
def test_conv_filters_are_the_kernels_that_convolutions_read(name, shape, options):
    """``conv_filters`` (what curve training stores output-channel first) names exactly the
    kernels of the ``nn.Conv`` modules that a train-mode call runs, recorded here by
    intercepting the calls: with ``pointwise`` not the 1x1 kernels read as matrices, with
    ``conv3x3`` not the stride-1 3x3 kernels read as taps either."""
    model = create(name, 5, **options)
    variables = models.variable_shapes(model, shape)
    convs = set()

    def record(call, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            convs.add("/".join(context.module.path) + "/kernel")
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *shape)), train=True,
                                             mutable=["batch_stats"],
                                             rngs={"dropout": jax.random.PRNGKey(0)}),
                       variables)
    four_d = {k for k, v in pytrees.flatten(variables["params"]).items()
              if v.ndim == 4}
    assert models.conv_filters(model, variables["params"]) == convs
    assert (convs == four_d) == ("pointwise" not in options)  # the 1x1 matrices are left out


@pytest.mark.parametrize("name, shape, options", [
    ("cnn_small", (8, 8, 1), {}),
    ("resnet20", (32, 32, 3), {}),
    ("preresnet110", (32, 32, 3), {"depth": 11}),
    ("preresnet110", (32, 32, 3), {"depth": 11, "pointwise": "fused"}),
    ("vgg16_bn", (32, 32, 3), {}),
    ("vit_small", (32, 32, 3), TINY_VIT),
])
def test_kernel_dtypes_are_the_dtypes_the_models_compute_with(name, shape, options):
    """``kernel_dtypes`` names the kernels and the compute dtype: a bfloat16 model given its
    kernels in bfloat16 (as curve training forms them) computes what it computes from the
    float32 ones, bit for bit, in train mode."""
    model = create(name, 5, dtype="bfloat16", **options)
    variables = models.init_variables(model, KEY, (1, *shape))
    dtypes = models.kernel_dtypes(model, variables["params"])
    flat = pytrees.flatten(variables["params"])
    assert dtypes and set(dtypes) == {k for k in flat if k.endswith("/kernel")}
    assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}
    lowered = pytrees.unflatten(variables["params"],
                                {k: v.astype(dtypes.get(k, v.dtype)) for k, v in flat.items()})
    x = jax.random.normal(KEY, (2, *shape))

    def logits(params):
        return model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"], rngs={"dropout": KEY})[0]

    def exact(params):  # XLA may skip a float32 -> bfloat16 -> float32 rounding otherwise
        return jax.jit(logits).lower(params).compile(
            {"xla_allow_excess_precision": False})(params)

    np.testing.assert_array_equal(exact(lowered), exact(variables["params"]))
    assert models.kernel_dtypes(create(name, 5, **options), flat) == {
        k: jnp.dtype(jnp.float32) for k in dtypes}


def test_kernel_dtypes_of_other_models_are_left_as_they_are():
    """A model from elsewhere (it may compute with a kernel in float32) or one without a
    compute dtype (Flax's ``dtype=None``) gets no kernel in another dtype."""
    from tiny_models import DenseBN

    class NoDtype(nn.Module):
        dtype: object = None

        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(2, dtype=self.dtype)(x)

    for model in (DenseBN(dtype=jnp.bfloat16), NoDtype()):
        params = model.init(KEY, jnp.zeros((1, 8, 8, 1)), train=False)["params"]
        assert models.kernel_dtypes(model, params) == {}
