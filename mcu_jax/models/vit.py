"""Vision Transformer (Dosovitskiy et al., 2021) with the parameter names of google-research's
``vision_transformer`` (vit_jax) checkpoints, so their ``.npz`` files map key-for-key.

Patch embedding (a conv with kernel = stride = patch, named ``embedding``), a learned class
token ``cls``, learned position embeddings ``Transformer/posembed_input/pos_embedding``,
pre-LayerNorm encoder blocks ``Transformer/encoderblock_{i}`` (``LayerNorm_0``,
``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``), a final
``Transformer/encoder_norm`` and a linear ``head`` on the class token (zero-initialised, as
in vit_jax). LayerNorm epsilon 1e-6, tanh-approximate GELU, as in vit_jax. No BatchNorm:
``bn_momentum`` exists only for the shared model interface and is unused.

Configurations (both override-able through ``create`` options):

- ``vit_b16``: ViT-B/16 for 224x224: patch 16, width 768, depth 12, 12 heads, MLP 3072;
  86,567,656 parameters with 1000 classes.
- ``vit_small``: the standard ViT-S (DeiT-S) shape, width 384, depth 12, 6 heads, MLP 1536,
  with patch 4 for 32x32 inputs (64 patches + class token); 21,342,346 parameters with
  10 classes.

The position-embedding length is fixed by the input size at initialisation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mcu_jax.models.layers import resolve_dtype

LN_EPSILON = 1e-6


class MlpBlock(nn.Module):
    """Dense-GELU-dropout-Dense-dropout."""

    mlp_dim: int
    dropout_rate: float
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        features = x.shape[-1]
        kw = dict(
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        x = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0", **kw)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(features, name="Dense_1", **kw)(x)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class EncoderBlock(nn.Module):
    """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        ln = dict(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32)
        y = nn.LayerNorm(name="LayerNorm_0", **ln)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(),
            broadcast_dropout=False,
            dropout_rate=self.attention_dropout_rate,
            force_fp32_for_softmax=True,
            name="MultiHeadDotProductAttention_1",
        )(y, y, deterministic=not train)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        x = x + y
        y = nn.LayerNorm(name="LayerNorm_2", **ln)(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="MlpBlock_3")(y, train)
        return x + y


class PositionEmbedding(nn.Module):
    """Adds a learned (1, tokens, width) position embedding."""

    @nn.compact
    def __call__(self, x):
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]), jnp.float32
        )
        return x + pos.astype(x.dtype)


class Transformer(nn.Module):
    """Position embeddings, ``depth`` encoder blocks and the final LayerNorm."""

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = PositionEmbedding(name="posembed_input")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.attention_dropout_rate,
                self.dtype,
                name=f"encoderblock_{i}",
            )(x, train)
        return nn.LayerNorm(
            epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32, name="encoder_norm"
        )(x)


class VisionTransformer(nn.Module):
    """ViT classifier on the class token; defaults are ViT-B/16."""

    casts_kernels: ClassVar[bool] = True  # every layer casts its kernel to dtype

    num_classes: int
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9  # unused: no BatchNorm; kept for the shared model interface
    patch_size: int = 16
    hidden: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        dt = resolve_dtype(self.dtype)
        n, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input: got {h}x{w} images, expected sides divisible by patch {p}")
        x = nn.Conv(
            self.hidden,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            param_dtype=jnp.float32,
            name="embedding",
        )(x.astype(dt))
        x = x.reshape(n, -1, self.hidden)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (n, 1, self.hidden)), x], axis=1)
        x = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            self.attention_dropout_rate,
            dt,
            name="Transformer",
        )(x, train)
        x = nn.Dense(
            self.num_classes,
            dtype=dt,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.zeros,
            name="head",
        )(x[:, 0])
        return x.astype(jnp.float32)


#: ViT-S shape (width 384, depth 12, 6 heads, MLP 1536) with patch 4 for 32x32 inputs.
VIT_SMALL = dict(patch_size=4, hidden=384, depth=12, num_heads=6, mlp_dim=1536)
#: ViT-B/16 for 224x224 inputs.
VIT_B16 = dict(patch_size=16, hidden=768, depth=12, num_heads=12, mlp_dim=3072)


def vit_small(num_classes: int, **options: Any) -> VisionTransformer:
    """ViT-S/4 for 32x32 inputs; ``options`` override the config (e.g. ``depth=6``)."""
    return VisionTransformer(num_classes=num_classes, **{**VIT_SMALL, **options})


def vit_b16(num_classes: int, **options: Any) -> VisionTransformer:
    """ViT-B/16 for 224x224 inputs; ``options`` override the config."""
    return VisionTransformer(num_classes=num_classes, **{**VIT_B16, **options})
