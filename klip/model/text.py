"""Text tower and causal decoder.

`TextEncoder` is bidirectional: alone it gives the contrastive features; given image tokens,
its cross-attention sublayers fuse them in (the matching path, BLIP-style, sharing the text
tower). `TextDecoder` is a causal stack with cross-attention to the image tokens in every layer;
it reads the text tower's embeddings (tokens + positions) and has blocks of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klip.model.layers import Encoder, layer_norm, param

EMBED_INIT = nnx.initializers.normal(stddev=0.02)


def cross_attention_every(config) -> int:
  """`text.cross_attention_every` (default 1: every layer; 0: no fusion path)."""
  every = int(config.text.get("cross_attention_every", 1))
  if every < 0:
    raise ValueError(f"text.cross_attention_every must be >= 0, got {every}")
  return every


def decoder_depth(config) -> int:
  """`decoder.depth` (default: the text tower's depth)."""
  decoder = config.get("decoder")
  depth = int(decoder.get("depth", config.text.depth) if decoder else config.text.depth)
  if depth < 1:
    raise ValueError(f"decoder.depth must be >= 1, got {depth}")
  return depth


def _stack(config, depth: int, cross_every: int, *, rngs: nnx.Rngs) -> Encoder:
  text = config.text
  return Encoder(depth, text.width, text.heads, text.mlp_dim,
                 cross_width=config.vit.width if cross_every else None,
                 cross_every=cross_every, scan=config.scan_layers,
                 remat_policy=config.remat_policy, dtype=jnp.dtype(config.dtype), rngs=rngs)


class TextEncoder(nnx.Module):
  """Bidirectional Transformer over int32 tokens [B, L]; pad tokens are masked as keys."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    text = config.text
    self.max_len = text.max_len
    self.pad_id = text.pad_id
    self.dtype = jnp.dtype(config.dtype)
    every = cross_attention_every(config)
    self.fusion = every > 0
    self.embed = nnx.Embed(text.vocab_size, text.width, rngs=rngs,
                           embedding_init=param(EMBED_INIT, ("vocab", "embed")))
    self.posemb = nnx.Param(
        param(EMBED_INIT, ("length", "embed"))(rngs.params(), (text.max_len, text.width)))
    self.encoder = _stack(config, text.depth, every, rngs=rngs)
    self.norm = layer_norm(text.width, self.dtype, rngs)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Token + position embeddings [B, L, width] in the compute dtype."""
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"expected tokens [B, L] with L <= max_len {self.max_len}, "
                       f"got shape {tuple(tokens.shape)}")
    length = tokens.shape[1]
    return (self.embed(tokens) + self.posemb[:length]).astype(self.dtype)

  def __call__(self, tokens: jax.Array, image_tokens: jax.Array | None = None) -> jax.Array:
    """Hidden states [B, L, width]; fused with `image_tokens` [B, 1 + N, vit width] if given."""
    if image_tokens is not None and not self.fusion:
      raise ValueError("text.cross_attention_every is 0: the text tower has no fusion path")
    kv = None if image_tokens is None else image_tokens.astype(self.dtype)
    mask = (tokens != self.pad_id)[:, None, None, :]
    return self.norm(self.encoder(self.embed_tokens(tokens), mask, kv=kv))


class TextDecoder(nnx.Module):
  """Causal Transformer over embedded tokens with cross-attention to image tokens in every layer.

  Queries attend to earlier positions that are not padding; every image token is a key.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.pad_id = config.text.pad_id
    self.dtype = jnp.dtype(config.dtype)
    self.layers = _stack(config, decoder_depth(config), 1, rngs=rngs)
    self.norm = layer_norm(config.text.width, self.dtype, rngs)

  def __call__(self, x: jax.Array, tokens: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """x [B, L, width] embeds `tokens` [B, L]; returns hidden states [B, L, width]."""
    length = tokens.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None, None] & (tokens != self.pad_id)[:, None, None, :]
    return self.norm(self.layers(x, mask, kv=image_tokens.astype(self.dtype)))
