"""Tiny Flax models shared by tests: small enough to check against numpy by hand."""

import flax.linen as nn
import jax.numpy as jnp


class DenseBN(nn.Module):
    """Dense -> BatchNorm -> Dense: the BN input is x @ W + b, easy to compute in numpy."""

    num_classes: int = 3
    bn_momentum: float = 0.9
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(5, name="hidden")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name="bn")(x)
        return nn.Dense(self.num_classes)(nn.relu(x))


class TwoBN(nn.Module):
    """Dense -> BatchNorm "bn" -> Dense -> BatchNorm "bn-2" -> Dense: parameter names whose
    order as strings ("bn-2/bias" < "bn/bias") differs from their order in the tree, as a
    user's model may have."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6, name="hidden")(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        x = nn.Dense(6, name="middle")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn-2")(x))
        return nn.Dense(self.num_classes, name="head")(x)
