"""Shared tiny fixtures: the digits set, a split, and a briefly trained small CNN."""

import atexit
import os
import shutil
import tempfile

# Entry points called by tests (in-process or as subprocesses) leave their own persistent
# compilation cache off, so tests neither read nor write ~/.cache; test_compile_cache.py
# turns it on explicitly in subprocesses.
os.environ["MCU_JAX_COMPILE_CACHE"] = "off"

# One JAX compilation cache per test run instead, in a temporary folder that the first
# process (pytest, or xdist's controller) makes and removes at exit, and that its workers
# and the subprocesses tests start inherit through the environment. Many tests compile the
# same small programs again (a cnn_small step, a sweep, each as a new closure), so every
# program is cached, however short its compilation: on 2 cores the suite took 6-7 minutes
# instead of 8.2-9.4 (2026-12-06). A hit runs the very program a compile would build, and
# tests that count compilations still see it (JAX reports a cache hit as a compilation).
# A folder given as MCU_JAX_TEST_XLA_CACHE is used and kept (a cache that outlasts the run).
_RUN_CACHE = "MCU_JAX_TEST_XLA_CACHE"
if _RUN_CACHE not in os.environ:
    os.environ[_RUN_CACHE] = tempfile.mkdtemp(prefix="mcu-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ[_RUN_CACHE], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_RUN_CACHE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# Tests run tiny programs, so XLA's CPU compiler costs them more than running does: without
# LLVM's optimisations (the same operations, compiled with less work) the suite took 6.6
# minutes on 2 cores instead of 8.75 (2026-12-07), every test passing either way. Workers
# and the subprocesses tests start inherit the flag; a level given in XLA_FLAGS is kept.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _FLAGS:
    os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mcu_jax import train  # noqa: E402
from mcu_jax.data import Images, load_dataset, make_split  # noqa: E402
from mcu_jax.models import create, init_variables  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_split(digits):
    return make_split(digits, "random", seed=0)


@pytest.fixture(scope="session")
def digits_images(digits):
    return Images.from_dataset(digits, "train"), Images.from_dataset(digits, "test")


@pytest.fixture(scope="session")
def small_model(digits):
    return create("cnn_small", digits.num_classes)


@pytest.fixture(scope="session")
def theta_o(digits, digits_images, small_model):
    """cnn_small trained for 3 epochs on all of the digits training set."""
    train_images, _ = digits_images
    variables = init_variables(small_model, jax.random.PRNGKey(0), (1, 8, 8, 1))
    config = train.TrainConfig(epochs=3, lr=0.05, progress=False)
    variables, _ = train.fit(
        small_model, variables, train_images, np.arange(digits.num_train), config,
        jax.random.PRNGKey(1),
    )
    return variables


@pytest.fixture(scope="session")
def theta_p(theta_o, digits_images, digits_split, small_model):
    """One epoch of gradient ascent on D_f: a quick pre-unlearned end point."""
    from mcu_jax.methods.ga import ascent_loss

    train_images, _ = digits_images
    config = train.TrainConfig(epochs=1, lr=0.01, schedule="constant", progress=False)
    variables, _ = train.fit(small_model, theta_o, train_images, digits_split.forget, config,
                             jax.random.PRNGKey(5), loss_fn=ascent_loss)
    return variables
