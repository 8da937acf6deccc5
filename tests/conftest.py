"""Shared tiny fixtures: the digits set, a split, and a briefly trained small CNN."""

import os

# Entry points called by tests (in-process or as subprocesses) leave JAX's persistent
# compilation cache off, so tests neither read nor write ~/.cache; test_compile_cache.py
# turns it on explicitly in subprocesses.
os.environ["MCU_JAX_COMPILE_CACHE"] = "off"

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
