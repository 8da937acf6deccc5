"""A block's conv3 and the next block's conv1 in one kernel (models/chain.py), interpreted by
Pallas on the CPU, against numpy and the two plain kernels' computation; and the folded
PreResNet's evaluation runs it between its blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import kernel_calls

from mcu_jax import models
from mcu_jax.models import chain


def _operands(m, k, n, n_next, dtype, seed=0):
    """The chain's operands; ``a`` has negative values too (the kernel applies its ReLU, as
    the 1x1 kernel applies an identity map's)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    return (jax.random.normal(ks[0], (m, k)).astype(dtype),
            jax.random.normal(ks[1], (k, n)) / k ** 0.5,
            jax.random.normal(ks[2], (m, n)).astype(dtype),
            jax.random.normal(ks[3], (n,)),
            jax.random.uniform(ks[4], (n,), minval=0.5, maxval=1.5),
            jax.random.normal(ks[5], (n,)),
            jax.random.normal(ks[6], (n, n_next)) / n ** 0.5,
            jax.random.normal(ks[7], (n_next,)))


@pytest.mark.parametrize("shape,dtype", [((300, 16, 64, 32), jnp.float32),
                                         ((64, 64, 256, 64), jnp.float32),
                                         ((130, 32, 128, 64), jnp.bfloat16)])
def test_the_chain_computes_both_products(shape, dtype):
    """Against float64 numpy (several row programs with a part-empty last one; N in one
    column chunk or four), and against the two plain kernels' computation ("xla", which
    "auto" runs on the CPU) to the dtype's rounding; its gradient is theirs."""
    ops = _operands(*shape, dtype)
    a, w, r, mean, mul, bias, w_next, b_next = (np.asarray(v, np.float64) for v in ops)
    out = np.maximum(a, 0) @ w + r
    want = (out, np.maximum(np.maximum((out - mean) * mul + bias, 0) @ w_next + b_next, 0))
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    got = chain.matmul_chain(*ops, impl="interpret")
    plain = chain.matmul_chain(*ops, impl="xla")
    for g, p, x in zip(got, plain, want, strict=True):
        assert g.dtype == dtype and g.shape == x.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), x, **tol)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(p, np.float32),
                                   **tol)

    def loss(impl, *xs):
        return sum(jnp.sum(o.astype(jnp.float32) ** 2)
                   for o in chain.matmul_chain(*xs, impl=impl))

    grads = [jax.grad(loss, argnums=tuple(range(1, 9)))(impl, *ops)
             for impl in ("interpret", "xla")]
    for g, p in zip(*grads, strict=True):
        scale = float(jnp.max(jnp.abs(p.astype(jnp.float32)))) + 1.0
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(p, np.float32),
                                   rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_vmap_over_the_weights_is_a_loop():
    """The sweep's vmap over t batches the activations, filters and BatchNorm maps (each t
    its own): the batched kernel computes what it computes for each t alone."""
    ops = _operands(40, 16, 64, 16, jnp.float32)
    stacked = [jnp.stack([v, 0.5 * v + 0.1]) for v in ops]
    batched = jax.vmap(functools.partial(chain.matmul_chain, impl="interpret"))(*stacked)
    for i in range(2):
        alone = chain.matmul_chain(*(v[i] for v in stacked), impl="interpret")
        for b, x in zip(batched, alone, strict=True):
            np.testing.assert_allclose(b[i], x, rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_impls_are_refused():
    ops = _operands(32, 16, 64, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"residual must be \(32, 64\)"):
        chain.matmul_chain(ops[0], ops[1], ops[2][:, :16], *ops[3:])
    with pytest.raises(ValueError, match=r"w_next \(32, 16\)"):
        chain.matmul_chain(*ops[:6], ops[6][:32], ops[7], impl="interpret")
    with pytest.raises(ValueError, match="impl must be"):
        chain.matmul_chain(*ops, impl="cuda")
    with pytest.raises(ValueError, match=r"w_next \(N, N2\)"):  # not a matrix
        chain.matmul_chain(*ops[:6], ops[6][None], ops[7])
    # channel counts the kernel does not take (not powers of two; K or N2 over the checked
    # 64): "auto" runs the plain computation
    assert chain.chain_fits(64, 256, 64) and not chain.chain_fits(128, 256, 64)
    assert not chain.chain_fits(16, 64, 128) and not chain.chain_fits(16, 48, 16)
    odd = _operands(8, 16, 48, 16, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        chain.matmul_chain(*odd, impl="interpret")
    np.testing.assert_array_equal(chain.matmul_chain(*odd)[1],
                                  chain.matmul_chain(*odd, impl="xla")[1])


def test_the_folded_model_chains_its_blocks():
    """Evaluation with BatchNorm folded and the kernels runs the chain kernel between each
    two blocks (depth 20: 6 blocks, 5 chains) and conv3's kernel alone after the last,
    with the unfolded model's logits."""
    base = models.create("preresnet110", 5, depth=20)
    model = models.folded(models.with_pointwise(base, "interpret"))
    v = models.init_variables(base, jax.random.PRNGKey(0), (1, 8, 8, 3))
    v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 0.3,
                                                            v["batch_stats"])}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(v).jaxpr
    assert len(kernel_calls(jaxpr, "matmul_chain")) == 5
    # the first block's conv1 and the last one's conv3: every other 1x1 runs in a chain
    assert len(kernel_calls(jaxpr, "bn_relu_matmul")) == 2
    np.testing.assert_allclose(model.apply(v, x, train=False),
                               base.apply(v, x, train=False), rtol=1e-4, atol=1e-5)
