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
