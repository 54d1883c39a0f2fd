"""The two-tower model: ViT + text encoder, linear projections and a learned temperature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klip.model.layers import DENSE_INIT, param
from klip.model.text import TextEncoder
from klip.model.vit import ViT

MAX_SCALE = 100.0


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit vectors along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _projection(width: int, embed_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(width, embed_dim, use_bias=False, dtype=jnp.float32, rngs=rngs,
                    kernel_init=param(DENSE_INIT, ("embed", "proj")))


class Model(nnx.Module):
  """Image and text towers whose pooled outputs are projected to a shared unit sphere.

  Towers compute in `config.dtype`; projections, normalisation and outputs are float32.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.image = ViT(config, rngs=rngs)
    self.text = TextEncoder(config, rngs=rngs)
    self.image_proj = _projection(config.vit.width, config.embed_dim, rngs)
    self.text_proj = _projection(config.text.width, config.embed_dim, rngs)
    init_scale = math.log(1.0 / config.temperature_init)
    self.logit_scale = nnx.Param(
        param(nnx.initializers.constant(init_scale), ())(rngs.params(), ()))

  def encode_image(self, images: jax.Array) -> jax.Array:
    """ViT tokens [B, 1 + N, width], CLS first."""
    return self.image(images)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Text hidden states [B, L, width]."""
    return self.text(tokens)

  def embed_images(self, images: jax.Array) -> jax.Array:
    """Unit-norm float32 image embeddings [B, embed_dim] from the CLS token."""
    cls = self.encode_image(images)[:, 0].astype(jnp.float32)
    return l2_normalize(self.image_proj(cls))

  def embed_texts(self, tokens: jax.Array) -> jax.Array:
    """Unit-norm float32 text embeddings [B, embed_dim] from position 0 (the [ENC] token)."""
    first = self.encode_text(tokens)[:, 0].astype(jnp.float32)
    return l2_normalize(self.text_proj(first))

  def temperature_scale(self) -> jax.Array:
    """exp(logit_scale), with logit_scale clipped to [0, log 100]."""
    return jnp.exp(jnp.clip(self.logit_scale[...], 0.0, math.log(MAX_SCALE)))

  def __call__(self, images: jax.Array, tokens: jax.Array):
    """(image embeddings, text embeddings, logit scale)."""
    return self.embed_images(images), self.embed_texts(tokens), self.temperature_scale()


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on abstract models from nnx.eval_shape)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
