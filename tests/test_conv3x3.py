"""The fused 3x3 convolution (models/conv3x3.py): the kernel (interpreted by Pallas on the
CPU) against an independent float64 computation, its derivative, vmap and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import kernel_calls

from mcu_jax import models, sweep
from mcu_jax.models import conv3x3


def _operands(b, h, w, k, n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, h, w, k)).astype(dtype), rng.normal(size=k).astype(np.float32),
            rng.uniform(0.5, 2.0, size=k).astype(np.float32),
            rng.normal(size=k).astype(np.float32),
            (rng.normal(size=(3, 3, k, n)) / np.sqrt(9 * k)).astype(np.float32))


def _numpy(z, mean, mul, bias, w):
    """float64 numpy: the activation zero-padded, then the nine taps summed by loops."""
    a = np.maximum((z.astype(np.float64) - mean) * mul + bias, 0.0)
    b, h, width, _ = a.shape
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(padded[:, dy:dy + h, dx:dx + width] @ w[dy, dx].astype(np.float64)
              for dy in range(3) for dx in range(3))
    return out, out.sum((0, 1, 2)), (out * out).sum((0, 1, 2))


@pytest.mark.parametrize("b,h,w,k,n", [(3, 8, 6, 16, 32), (2, 5, 7, 32, 16), (1, 4, 4, 64, 64)])
def test_kernel_equals_an_independent_computation(b, h, w, k, n):
    """Interpreted, the kernel gives the padded convolution of relu(bn(z)) and its channel
    sums: with pixels of one image in two programs and programs spanning two images (8 x 6,
    5 x 7), with the last block part empty (70 and 16 pixels in blocks of 128 and 64)."""
    z, mean, mul, bias, wt = _operands(b, h, w, k, n)
    out, (s1, s2) = conv3x3.bn_relu_conv3x3(z, mean, mul, bias, wt, stats=True,
                                            impl="interpret")
    want, w1, w2 = _numpy(z, mean, mul, bias, wt)
    assert out.shape == (b, h, w, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s1, w1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(s2, w2, rtol=1e-4, atol=1e-3)
    plain, none = conv3x3.bn_relu_conv3x3(z, mean, mul, bias, wt, impl="interpret")
    assert none is None
    np.testing.assert_array_equal(plain, out)


def test_every_impl_gives_the_same_values_in_both_dtypes():
    """The kernel, XLA's ops and "auto" (XLA's on the CPU) agree: float32 to rounding,
    bfloat16 to one bfloat16 rounding of the output (its sums taken from the rounded
    output)."""
    for dtype, tol in ((np.float32, 1e-5), (jnp.bfloat16, 2 ** -7)):
        z, mean, mul, bias, w = _operands(2, 8, 8, 16, 16, dtype=dtype, seed=1)
        results = {impl: conv3x3.bn_relu_conv3x3(z, mean, mul, bias, w, stats=True, impl=impl)
                   for impl in ("interpret", "xla", "auto")}
        np.testing.assert_array_equal(results["auto"][0], results["xla"][0])
        ref, (r1, r2) = results["xla"]
        out, (s1, s2) = results["interpret"]
        assert out.dtype == ref.dtype == jnp.dtype(dtype)
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
        np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=tol * scale)
        np.testing.assert_allclose(s1, r1, rtol=tol, atol=tol * scale * 128)
        np.testing.assert_allclose(s2, r2, rtol=2 * tol, atol=tol * scale ** 2 * 128)


def _kernel_outputs(jaxpr, name: str) -> list[int]:
    """How many arrays each call of the Pallas kernel ``name`` in ``jaxpr`` writes."""
    return [len(e.outvars) for e in kernel_calls(jaxpr, name)]


def _loss(impl, stats, use=(0.1, 0.01), output=True):
    """A loss of the kernel's output (unless not ``output``: its cotangent is then a
    symbolic zero) and, with ``stats``, of its sums (weights ``use``: a zero weight leaves
    that sum out, so its cotangent is a symbolic zero)."""
    def f(*args):
        out, sums = conv3x3.bn_relu_conv3x3(*args, stats=stats, impl=impl)
        extra = sum(jnp.sum(s * u) for s, u in zip(sums or (), use, strict=False) if u)
        return (jnp.sum(jnp.sin(out.astype(jnp.float32))) if output else 0.0) + extra
    return f


def _gradients(args, stats, use=(0.1, 0.01), output=True, argnums=tuple(range(5))):
    """``(through the interpreted kernels, by autodiff of XLA's ops)``: the gradients of
    :func:`_loss` in ``argnums``."""
    return tuple(jax.grad(_loss(impl, stats, use, output), argnums=argnums)(*args)
                 for impl in ("interpret", "xla"))


@pytest.mark.parametrize("shape,stats,use,output", [
    ((2, 6, 6, 16, 16), True, (0.1, 0.01), True), ((2, 6, 6, 16, 16), False, (), True),
    # several programs of rows (432 pixels, 256 a program) and two blocks of input channels
    # (16 a program for N = 64), one image spanning two programs
    ((3, 12, 12, 32, 64), True, (0.1, 0.01), True),
    ((2, 5, 7, 16, 32), True, (0.0, 0.01), True), ((2, 5, 7, 16, 32), True, (0.1, 0.0), True),
    ((2, 5, 7, 16, 32), True, (0.1, 0.01), False)])  # the sums alone
def test_the_backward_kernel_is_autodiffs_derivative(shape, stats, use, output):
    """Gradients of a loss of the output and its sums (or one of them, or the sums alone)
    through the backward kernel equal autodiff of the plain computation's (XLA's ops), in
    every operand."""
    got, want = _gradients(_operands(*shape, seed=2), stats, use, output)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_the_backward_kernel_in_bfloat16():
    """In bfloat16 the kernel's gradients equal autodiff's up to bfloat16 rounding (each
    rounds the output's cotangent and z's once, in other places)."""
    got, want = _gradients(_operands(2, 6, 6, 16, 32, dtype=jnp.bfloat16, seed=4), True)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype
        scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
        np.testing.assert_allclose(np.float32(g), np.float32(r), atol=2 ** -6 * scale)


def test_the_backward_kernel_computes_only_what_is_differentiated():
    """Differentiated in z alone, the backward kernel writes no weight gradient; in w alone
    (a frozen input), no input cotangent; either way the values are autodiff's."""
    args = _operands(2, 4, 4, 16, 16, seed=5)
    for argnums, outputs in (((0,), 2), ((4,), 2), ((0, 4), 3)):
        f = jax.grad(_loss("interpret", True), argnums=argnums)
        assert _kernel_outputs(jax.make_jaxpr(f)(*args).jaxpr,
                               "bn_relu_conv3x3_backward") == [outputs], argnums
        got, want = _gradients(args, True, argnums=argnums)
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_vmap_over_weights_equals_a_loop():
    """Mapped over several weights and inputs at once (the sweep's vmap over t), the kernel
    gives what it gives one at a time."""
    z, mean, mul, bias, w = _operands(2, 4, 4, 16, 16, seed=3)
    ws = np.stack([w, 2 * w, -w])
    zs = np.stack([z, z + 1, z - 1])

    def one(zi, wi):
        return conv3x3.bn_relu_conv3x3(zi, mean, mul, bias, wi, stats=True, impl="interpret")

    out, sums = jax.vmap(one)(zs, ws)
    for i in range(3):
        o, s = one(zs[i], ws[i])
        np.testing.assert_allclose(out[i], o, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sums[1][i], s[1], rtol=1e-6, atol=1e-5)


def test_bad_input_is_refused_early():
    z, mean, mul, bias, w = _operands(1, 4, 4, 16, 16)
    with pytest.raises(ValueError, match=r"z must be \(B, H, W, K\)"):
        conv3x3.bn_relu_conv3x3(z[0], mean, mul, bias, w)
    with pytest.raises(ValueError, match=r"needs w \(3, 3, 16, N\)"):
        conv3x3.bn_relu_conv3x3(z, mean, mul, bias, w[:1])
    with pytest.raises(ValueError, match="impl must be one of"):
        conv3x3.bn_relu_conv3x3(z, mean, mul, bias, w, impl="cuda")
    z3, mean3, mul3, bias3, w3 = _operands(1, 4, 4, 24, 16)
    with pytest.raises(ValueError, match="powers of two from 16 to 64; got K=24"):
        conv3x3.bn_relu_conv3x3(z3, mean3, mul3, bias3, w3, impl="interpret")
    # "auto" takes any channel count: the plain computation where the kernel does not fit
    out, _ = conv3x3.bn_relu_conv3x3(z3, mean3, mul3, bias3, w3)
    np.testing.assert_allclose(out, _numpy(z3, mean3, mul3, bias3, w3)[0], rtol=1e-4,
                               atol=1e-4)


def test_block_rows_keep_tiles_small():
    assert [conv3x3.block_rows(c, c) for c in (16, 32, 64)] == [128, 128, 64]
    # the backward kernel: (pixels a step, input channels a program, pixels a program) for
    # PreResNet-110's three shapes at batch 128, and the test's two programs of 256 pixels
    assert [conv3x3.backward_blocks(b * s * s, c, c) for b, s, c in (
        (128, 32, 16), (128, 16, 32), (128, 8, 64))] == [(64, 16, 512), (32, 16, 256),
                                                        (16, 16, 256)]
    assert conv3x3.backward_blocks(432, 32, 64) == (16, 16, 256)
    assert conv3x3.kernel_fits(16, 64) and not conv3x3.kernel_fits(128, 128)


def test_the_model_with_the_kernel_computes_the_same():
    """PreResNet with ``conv3x3`` has the same variables (names, shapes, initial values) and
    computes the same train-mode logits, batch statistics (the running ones updated from
    those the kernels' ops return) and gradients, eval-mode logits
    (also with BatchNorm folded: bn3 then folded into a cuDNN conv2 instead) as with the 1x1
    kernel alone, up to float rounding (depth 11: stage 1's block takes the kernels, the
    strided first blocks of stages 2 and 3 keep cuDNN)."""
    base = models.create("preresnet110", 10, depth=11, pointwise="interpret")
    kernel = models.with_conv3x3(base, "interpret")
    v = models.init_variables(base, jax.random.PRNGKey(0), (1, 16, 16, 3))
    same = models.init_variables(kernel, jax.random.PRNGKey(0), (1, 16, 16, 3))
    jax.tree.map(np.testing.assert_array_equal, same, v)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))

    def train_loss(params, m):
        logits, _ = m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits ** 2)

    def run(m):
        trained = m.apply(v, x, train=True, mutable=["batch_stats"])
        return (trained, m.apply(v, x, train=False), models.folded(m).apply(v, x, train=False),
                jax.grad(train_loss)(v["params"], m))

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 run(kernel), run(base))
    # the kernel runs in stage 1's block, in train mode and in evaluation, not where bn3 is
    # folded into conv2 (cuDNN's convolution with its bias and ReLU)
    for m, train, calls in ((kernel, True, 1), (kernel, False, 1),
                            (models.folded(kernel), False, 0), (base, True, 0)):
        text = str(jax.make_jaxpr(lambda v, m=m, t=train: m.apply(
            v, x, train=t, mutable=["batch_stats"] if t else False))(v))
        assert len(re.findall(r"\bname=bn_relu_conv3x3\b", text)) == calls, (m.conv3x3, train)
    # and its backward kernel in the gradient; the BatchNorms the kernels apply in train
    # mode (bn1, bn2, bn3 in stage 1, bn3 in the strided blocks; bn3 alone without the 3x3
    # kernel) take their derivative in one finishing kernel each (bn_input)
    for m, calls, finishing in ((kernel, [3], 5), (base, [], 3)):
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, m=m: train_loss(p, m)))(v["params"]).jaxpr
        assert _kernel_outputs(jaxpr, "bn_relu_conv3x3_backward") == calls
        assert len(kernel_calls(jaxpr, "bn_finish")) == finishing


def test_the_kernel_needs_the_1x1_kernel():
    base = models.create("preresnet110", 10, depth=11)
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        models.with_conv3x3(base, "fused")
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        models.init_variables(base.clone(conv3x3="fused"), jax.random.PRNGKey(0),
                              (1, 8, 8, 3))
    with pytest.raises(ValueError, match="conv3x3 must be one of"):
        models.with_conv3x3(base, "cudnn")
    assert models.with_conv3x3(base, "conv").conv3x3 == "conv"  # nothing to need
    cnn = models.create("cnn_small", 10)
    assert models.with_conv3x3(cnn, "fused") is cnn  # no such field: unchanged


def test_sweep_with_the_kernel_measures_the_same(digits_images, digits_split):
    """``conv3x3`` changes how the sweep computes, not what: the same accuracies and (up to
    float rounding) the same probabilities and BatchNorm statistics at every t, with the
    kernel interpreted under vmap over t, BatchNorm batches two at once and a remainder."""
    train_images, test_images = digits_images
    model = models.create("preresnet110", 10, depth=11)
    points = [models.init_variables(model, jax.random.PRNGKey(i), (8, 8, 1))["params"]
              for i in range(3)]
    template = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))["batch_stats"]
    args = (model, points, np.array([0.0, 0.6]), template,
            (train_images, digits_split.retain[:300]),
            {"t": (test_images, digits_split.test)})
    options = dict(return_probs=True, return_stats=True, bn_batch_size=128, strategy="vmap",
                   bn_group=2, pointwise="interpret")
    plain = sweep.sweep(*args, **options)
    kernel = sweep.sweep(*args, **options, conv3x3="interpret")
    for name in plain.acc:
        np.testing.assert_allclose(kernel.acc[name], plain.acc[name], atol=1e-4)
        np.testing.assert_allclose(kernel.probs[name], plain.probs[name], rtol=1e-3,
                                   atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 kernel.batch_stats, plain.batch_stats)
    with pytest.raises(ValueError, match="needs pointwise"):
        sweep.sweep(*args, **{**options, "pointwise": "conv"}, conv3x3="fused")


def test_the_kernels_in_the_problem_and_the_run_records():
    """ProblemConfig.conv3x3 builds the model with the kernels (with the 1x1 kernel, PreResNet
    only; refused otherwise before any data is loaded); every model accepts "conv"; a
    record made before the field existed still matches the default. Curve training keeps
    the stride-1 blocks' 3x3 filters in Flax's order then (the kernels read them so)."""
    from mcu_jax import runs
    from mcu_jax.problem import ProblemConfig, _parts

    assert models.create("cnn_small", 5, conv3x3="conv") == models.create("cnn_small", 5)
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        ProblemConfig(model="preresnet110", conv3x3="fused")
    with pytest.raises(ValueError, match="conv3x3 must be one of .* got 'interpret'"):
        ProblemConfig(model="preresnet110", pointwise="fused", conv3x3="interpret")
    with pytest.raises(ValueError, match="model 'cnn_small' has no fused 1x1"):
        ProblemConfig(model="cnn_small", pointwise="fused", conv3x3="fused")
    with pytest.raises(ValueError, match="conv3x3='fused' needs pointwise"):
        models.create("preresnet110", 5, conv3x3="fused")
    model = _parts(ProblemConfig(model="preresnet110", pointwise="fused", conv3x3="fused"))[2]
    assert (model.pointwise, model.conv3x3) == ("fused", "fused")
    assert "conv3x3" not in runs.model_identity(models.with_conv3x3(model, "conv"))
    assert runs.first_difference({"problem": {"dtype": "float32"}},
                                 {"problem": {"dtype": "float32", "conv3x3": "conv"}}) is None
    assert runs.first_difference({"problem": {"dtype": "float32"}},
                                 {"problem": {"dtype": "float32", "conv3x3": "fused"}})
    params = models.init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 3))["params"]
    filters = models.conv_filters(model, params)
    both = models.conv_filters(models.with_conv3x3(model, "conv"), params)
    assert both - filters == {f"stage1_block{b}/conv2/kernel" for b in range(12)} | {
        f"stage{s}_block{b}/conv2/kernel" for s in (2, 3) for b in range(1, 12)}
    assert filters == {"stem/kernel", *(f"stage{s}_block0/{n}/kernel" for s in (1, 2, 3)
                                        for n in ("shortcut", "conv2") if (s, n) != (1, "conv2"))}


def test_a_curve_step_with_the_kernels_is_the_same_step(digits_images):
    """One curve-training step of PreResNet with the 3x3 kernels (interpreted, with the
    stride-1 3x3 filters packed in Flax's order) gives the same loss and the same new
    control point as the step with cuDNN's convolutions, up to float rounding."""
    import optax

    from mcu_jax import mcu
    from mcu_jax.mcu import MCUConfig

    train_images, _ = digits_images
    base = models.create("preresnet110", 10, depth=11, pointwise="interpret")
    theta_o = models.init_variables(base, jax.random.PRNGKey(0), (8, 8, 1))
    theta_p = models.init_variables(base, jax.random.PRNGKey(1), (8, 8, 1))
    theta_c = jax.tree.map(lambda a, b: 0.5 * (a + b) + 0.01, theta_o["params"],
                           theta_p["params"])
    mask = jax.tree.map(lambda _: True, theta_o["params"])
    is_forget = np.arange(train_images.num_examples) % 7 == 0
    config = MCUConfig(progress=False, batch_size=16)
    idx = jnp.arange(16, dtype=jnp.int32)
    results = []
    for model in (base, models.with_conv3x3(base, "interpret")):
        state, consts, _ = mcu.setup_curve(model, theta_o, theta_p, theta_c, mask,
                                           train_images, is_forget, (99.0, 95.0), config)
        step = jax.jit(mcu.make_curve_step(model, optax.sgd(config.lr), config,
                                           theta_o["params"]))
        state, metrics = step(state, consts, idx, jax.random.PRNGKey(3))
        results.append((float(metrics["loss"]),
                        mcu.control_point(theta_o["params"], state.trainable, consts)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    moved = results[1][1]["stage1_block0"]["conv2"]["kernel"]
    assert not np.allclose(moved, theta_c["stage1_block0"]["conv2"]["kernel"])  # it trained
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 results[1][1], results[0][1])


def test_blocks_of_one_shape_build_the_kernels_once(monkeypatch):
    """The kernels are jitted functions: in a trace, the blocks whose convolutions have the
    same shapes share one build of each kernel (traced and lowered once, not once a call),
    here the 3x3 kernels' 3 shapes for 4 stride-1 blocks (depth 20), forward and
    backward; and fewer builds of the 1x1 backward kernel than its 12 calls (its derive
    function compares by value, ``pointwise.StaticPartial``)."""
    from mcu_jax import kernel_impl

    built = []
    real = kernel_impl.pallas_call

    def counting(kernel, *args, **options):
        built.append(options["name"])
        return real(kernel, *args, **options)

    monkeypatch.setattr(kernel_impl, "pallas_call", counting)
    model = models.create("preresnet110", 10, depth=20, pointwise="interpret",
                          conv3x3="interpret")
    v = models.init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 3))
    # a batch of 7 images: shapes no other test traces, so no build of theirs is reused
    # (jax.clear_caches would make the tests after this one compile again)
    x = jnp.zeros((7, 8, 8, 3))

    def loss(params):
        logits, _ = model.apply({**v, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits ** 2)

    for fn, name in ((loss, "bn_relu_conv3x3"), (jax.grad(loss), "bn_relu_conv3x3_backward")):
        built.clear()
        jaxpr = jax.make_jaxpr(fn)(v["params"]).jaxpr
        assert built.count(name) == 3 and len(kernel_calls(jaxpr, name)) == 4, built
    name = "bn_relu_matmul_backward"
    assert 0 < built.count(name) < len(kernel_calls(jaxpr, name)) == 12, built
