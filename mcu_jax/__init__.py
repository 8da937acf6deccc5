"""mcu-jax: Mode Connectivity Unlearning in JAX/Flax."""

__version__ = "0.1.0"
