"""kernel_impl: where "auto" picks a Pallas kernel or its XLA twin."""

import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import equations

from mcu_jax import kernel_impl, models


def _device(platform: str, version: str, kind: str):
    return types.SimpleNamespace(platform=platform, device_kind=kind,
                                 client=types.SimpleNamespace(platform_version=version))


@pytest.mark.parametrize("device, nvidia", [
    (_device("gpu", "PJRT C API\ncuda 13000", "NVIDIA H100 80GB HBM3"), True),
    (_device("gpu", "PJRT C API\ncuda 12030", "Tesla V100-SXM2-16GB"), True),
    # a deviceless target (jax.experimental.topologies): the version names the card
    (_device("gpu", "PJRT C API\nNVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"), True),
    (_device("gpu", "PJRT C API\nrocm 60342", "AMD Instinct MI300X"), False),
    (_device("cpu", "cpu", "cpu"), False),
    (_device("tpu", "PJRT C API\nlibtpu", "TPU v5 lite"), False),
])
def test_is_nvidia(device, nvidia):
    assert kernel_impl.is_nvidia(device) is nvidia


def test_default_device_is_nvidia_reads_the_default_device(monkeypatch):
    seen = []
    monkeypatch.setattr(kernel_impl, "is_nvidia", lambda d: seen.append(d) or False)
    kernel_impl.default_device_is_nvidia()
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        kernel_impl.default_device_is_nvidia()
    with jax.default_device("cpu"):
        kernel_impl.default_device_is_nvidia()
    assert seen == [jax.local_devices()[0], cpu, cpu]
    monkeypatch.undo()
    assert kernel_impl.default_device_is_nvidia() is kernel_impl.is_nvidia(
        jax.local_devices()[0])
    with jax.default_device(cpu):
        assert kernel_impl.default_device_is_nvidia() is False


def _traced(impl: str):
    """The jaxpr of ``dispatch(impl, ...)`` and which branches were traced."""
    traced = []

    def kernel(x):
        traced.append("kernel")
        return x * 2.0

    def plain(x):
        traced.append("plain")
        return x + x

    jaxpr = jax.make_jaxpr(lambda x: kernel_impl.dispatch(impl, kernel, plain, x))(
        jnp.ones(3))
    return jaxpr, traced


def _has_platform_choice(jaxpr) -> bool:
    return any(e.primitive.name == "platform_index" for e in equations(jaxpr.jaxpr))


def test_auto_picks_the_kernel_while_tracing_for_an_nvidia_gpu(monkeypatch):
    with jax.default_device(jax.devices("cpu")[0]):  # the choice left to the lowering
        jaxpr, traced = _traced("auto")
        assert sorted(traced) == ["kernel", "plain"] and _has_platform_choice(jaxpr)
        assert jax.jit(lambda x: kernel_impl.dispatch(
            "auto", lambda v: v * 2.0, lambda v: v + v, x))(jnp.ones(2)).tolist() == [2.0, 2.0]
    monkeypatch.setattr(kernel_impl, "default_device_is_nvidia", lambda: True)
    jaxpr, traced = _traced("auto")
    assert traced == ["kernel"] and not _has_platform_choice(jaxpr)
    for impl, branch in (("xla", "plain"), ("interpret", "kernel"), ("pallas", "kernel")):
        jaxpr, traced = _traced(impl)
        assert traced == [branch] and not _has_platform_choice(jaxpr), impl


def test_a_kernel_step_traced_for_an_nvidia_gpu_has_only_the_kernels(monkeypatch):
    """A PreResNet with the 1x1 and 3x3 kernels ("fused"), differentiated as curve training
    does, traced as on an NVIDIA GPU: its kernels are called without a platform choice
    around them (traced only: this host cannot lower a Triton kernel)."""
    monkeypatch.setattr(kernel_impl, "default_device_is_nvidia", lambda: True)
    model = models.with_conv3x3(models.with_pointwise(models.PreResNet(
        num_classes=10, depth=11), "fused"), "fused")
    variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"])
    assert not _has_platform_choice(jaxpr)
    names = {e.params["name"] for e in equations(jaxpr.jaxpr)
             if e.primitive.name == "pallas_call"}
    assert names >= {"bn_relu_matmul", "bn_relu_matmul_backward", "bn_relu_conv3x3",
                     "bn_relu_conv3x3_backward", "bn_coefficients", "bn_finish"}, names


def test_mark_absent_marks_only_modules_that_do_not_exist(monkeypatch):
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    for name in ("mcu_jax_no_such_package.tt", "mcu_jax.no_such_module"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    marked = kernel_impl.mark_absent(["json.tool", "mcu_jax_no_such_package.tt",
                                      "mcu_jax.no_such_module", "jax"])
    assert marked == ("mcu_jax_no_such_package.tt", "mcu_jax.no_such_module")
    for name in marked:
        assert sys.modules[name] is None
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
        monkeypatch.delitem(sys.modules, name)
    assert importlib.import_module("json.tool").__name__ == "json.tool"


def test_the_triton_dialects_missing_modules_are_marked_absent():
    """What the kernels' first call marks: ``<prefix>.tt`` for MLIR's search prefixes, where
    absent (none of them exists in the jaxlib this was written for)."""
    from jaxlib.mlir._mlir_libs import _mlir

    marked = kernel_impl.skip_missing_dialect_modules()
    names = [f"{p}.tt" for p in _mlir.globals.dialect_search_modules]
    assert set(marked) <= set(names)
    for name in names:
        assert (sys.modules.get(name, "") is None) == (name in marked)
    assert kernel_impl.skip_missing_dialect_modules() is marked  # once per process
