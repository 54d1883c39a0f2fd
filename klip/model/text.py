"""Text tower: token + learned position embeddings, padding-masked Encoder, final LayerNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klip.model.layers import Encoder, layer_norm, param

EMBED_INIT = nnx.initializers.normal(stddev=0.02)


class TextEncoder(nnx.Module):
  """Bidirectional Transformer over int32 tokens [B, L]; pad tokens are masked as keys."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    text = config.text
    self.max_len = text.max_len
    self.pad_id = text.pad_id
    self.dtype = jnp.dtype(config.dtype)
    self.embed = nnx.Embed(text.vocab_size, text.width, rngs=rngs,
                           embedding_init=param(EMBED_INIT, ("vocab", "embed")))
    self.posemb = nnx.Param(
        param(EMBED_INIT, ("length", "embed"))(rngs.params(), (text.max_len, text.width)))
    self.encoder = Encoder(text.depth, text.width, text.heads, text.mlp_dim,
                           scan=config.scan_layers, remat_policy=config.remat_policy,
                           dtype=self.dtype, rngs=rngs)
    self.norm = layer_norm(text.width, self.dtype, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"expected tokens [B, L] with L <= max_len {self.max_len}, "
                       f"got shape {tuple(tokens.shape)}")
    length = tokens.shape[1]
    x = (self.embed(tokens) + self.posemb[:length]).astype(self.dtype)
    mask = (tokens != self.pad_id)[:, None, None, :]
    return self.norm(self.encoder(x, mask))
