"""Text tower and causal decoder.

`TextEncoder` is bidirectional: alone it gives the contrastive features; given image tokens,
the cross-attention sublayers of its top `text.fusion_layers` blocks fuse them in (the matching
path, sharing the text tower as BLIP does). The blocks below them are text-only (ALBEF's split),
so a batch's matching pass reuses their states from the contrastive pass (`TextStates`) and
only the top blocks run again per (image, text) pair. `TextDecoder` is a causal stack with
cross-attention to the image tokens in every layer; it reads the text tower's embeddings
(tokens + positions) and has blocks of its own.

The decoder's context (`decoder.context`): "caption", every earlier token of the caption; or
"clause", only the earlier tokens of the token's own clause (from its [DEC] or [SEP] on), with
positions counted from the clause's start. With "clause" a value is predicted from the image
and its field's template prefix alone: the decoder cannot read it off the caption's other values
(which, written by one generator, predict each other), so it has to look at the image, and at
generation time one wrong value does not carry into the next clauses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from klip.data.caption import SEP
from klip.model.layers import Encoder, layer_norm, param

EMBED_INIT = nnx.initializers.normal(stddev=0.02)


def fusion_layers(config) -> int:
  """`text.fusion_layers`: top blocks of the text tower with cross-attention (0: no fusion
  path)."""
  depth = int(config.text.depth)
  n = int(config.text.fusion_layers)
  if not 0 <= n <= depth:
    raise ValueError(f"text.fusion_layers must be in [0, text.depth={depth}], got {n}")
  return n


def decoder_depth(config) -> int:
  """`decoder.depth` (0: no decoder, nothing to reconstruct)."""
  depth = int(config.decoder.depth)
  if depth < 0:
    raise ValueError(f"decoder.depth must be >= 0, got {depth}")
  return depth


CONTEXTS = ("caption", "clause")


def decoder_context(config) -> str:
  """`decoder.context`: what the decoder attends to before a token (one of CONTEXTS)."""
  context = str(config.decoder.context)
  if context not in CONTEXTS:
    raise ValueError(f"decoder.context must be one of {CONTEXTS}, got {context!r}")
  return context


def clause_layout(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(clause index, position within the clause), each [B, L] int32, of decoder tokens [B, L]:
  a clause starts at [DEC] (position 0) or at a [SEP] and runs to the next [SEP]."""
  starts = tokens == SEP
  clause = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
  index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return clause, index - start


def _stack(config, depth: int, cross: bool, *, rngs: nnx.Rngs) -> Encoder:
  text = config.text
  return Encoder(depth, text.width, text.heads, text.mlp_dim,
                 cross_width=config.vit.width if cross else None, scan=config.scan_layers,
                 remat_policy=config.remat_policy, dtype=jnp.dtype(config.dtype),
                 attention=config.attention, rngs=rngs)


class TextStates(NamedTuple):
  """The text tower's hidden states below its fusion blocks, and the key mask of the tokens."""
  x: jax.Array     # [B, L, width]
  mask: jax.Array  # bool [B, 1, 1, L]: True where the key is not padding

  def take(self, rows: jax.Array) -> TextStates:
    """The states of the texts at `rows` (e.g. the hard-negative texts of a batch)."""
    return TextStates(self.x[rows], self.mask[rows])


class TextEncoder(nnx.Module):
  """Bidirectional Transformer over int32 tokens [B, L]; pad tokens are masked as keys.

  `unimodal` holds the text-only blocks (None when every block fuses), `encoder` the top
  `fusion_layers` blocks, with cross-attention sublayers (all blocks, without them, when
  `fusion_layers` is 0).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    text = config.text
    self.max_len = text.max_len
    self.pad_id = text.pad_id
    self.dtype = jnp.dtype(config.dtype)
    fused = fusion_layers(config)
    self.fusion = fused > 0
    self.embed = nnx.Embed(text.vocab_size, text.width, rngs=rngs,
                           embedding_init=param(EMBED_INIT, ("vocab", "embed")))
    self.posemb = nnx.Param(
        param(EMBED_INIT, ("length", "embed"))(rngs.params(), (text.max_len, text.width)))
    lower = text.depth - fused if self.fusion else 0
    self.unimodal = _stack(config, lower, False, rngs=rngs) if lower else None
    self.encoder = _stack(config, text.depth - lower, self.fusion, rngs=rngs)
    self.norm = layer_norm(text.width, self.dtype, rngs)

  def embed_tokens(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Token + position embeddings [B, L, width] in the compute dtype; positions [B, L]
    (default 0..L-1 in every row)."""
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"expected tokens [B, L] with L <= max_len {self.max_len}, "
                       f"got shape {tuple(tokens.shape)}")
    pos = self.posemb[:tokens.shape[1]] if positions is None else self.posemb[...][positions]
    return (self.embed(tokens) + pos).astype(self.dtype)

  def embed_at(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """`embed_tokens` of one token per row: tokens [B] at positions [B] -> [B, width]."""
    positions = jnp.clip(positions, 0, self.max_len - 1)
    return (self.embed(tokens) + self.posemb[...][positions]).astype(self.dtype)

  def lower(self, tokens: jax.Array) -> TextStates:
    """The states entering the fusion blocks: embeddings through the text-only blocks."""
    mask = (tokens != self.pad_id)[:, None, None, :]
    x = self.embed_tokens(tokens)
    return TextStates(x if self.unimodal is None else self.unimodal(x, mask), mask)

  def upper(self, states: TextStates, image_tokens: jax.Array | None = None) -> jax.Array:
    """Hidden states [B, L, width] from `lower`'s states; fused with `image_tokens`
    [B, 1 + N, vit width] if given."""
    if image_tokens is not None and not self.fusion:
      raise ValueError("text.fusion_layers is 0: the text tower has no fusion path")
    kv = None if image_tokens is None else image_tokens.astype(self.dtype)
    return self.norm(self.encoder(states.x, states.mask, kv=kv))

  def __call__(self, tokens: jax.Array, image_tokens: jax.Array | None = None) -> jax.Array:
    """Hidden states [B, L, width]; fused with `image_tokens` [B, 1 + N, vit width] if given."""
    return self.upper(self.lower(tokens), image_tokens)


class TextDecoder(nnx.Module):
  """Causal Transformer over embedded tokens with cross-attention to image tokens in every layer.

  Queries attend to earlier positions that are not padding (of their own clause with
  `decoder.context` "clause"); every image token is a key.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.pad_id = config.text.pad_id
    self.clause_context = decoder_context(config) == "clause"
    self.dtype = jnp.dtype(config.dtype)
    self.layers = _stack(config, decoder_depth(config), True, rngs=rngs)
    self.norm = layer_norm(config.text.width, self.dtype, rngs)

  def __call__(self, x: jax.Array, tokens: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """x [B, L, width] embeds `tokens` [B, L]; returns hidden states [B, L, width]."""
    return self.norm(self.layers(x, self._mask(tokens), kv=image_tokens.astype(self.dtype)))

  def positions(self, tokens: jax.Array) -> jax.Array:
    """The positions [B, L] the tokens are embedded at: in the caption, or in their clause."""
    if self.clause_context:
      return clause_layout(tokens)[1]
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

  def _mask(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & (tokens != self.pad_id)[:, None, :]
    if self.clause_context:
      clause = clause_layout(tokens)[0]
      mask &= clause[:, :, None] == clause[:, None, :]
    return mask[:, None]

  def prefill(self, x: jax.Array, tokens: jax.Array, image_tokens: jax.Array) -> tuple:
    """`__call__`'s hidden states and the layers' key/value caches over the buffer `tokens`."""
    out, caches = self.layers.prefill(x, self._mask(tokens), kv=image_tokens.astype(self.dtype))
    return self.norm(out), caches

  def extend(self, x: jax.Array, tokens: jax.Array, positions: jax.Array, caches) -> tuple:
    """Hidden states [B, width] of one new token per row: x [B, width] embeds tokens[b,
    positions[b]] of the buffer `tokens` [B, L], which attends to the earlier positions that are
    not padding, as `__call__` would. Returns (states, updated caches)."""
    index = jnp.arange(tokens.shape[1])
    write = index == positions[:, None]
    mask = (index <= positions[:, None]) & (tokens != self.pad_id)
    if self.clause_context:
      clause = clause_layout(tokens)[0]
      mask &= clause == jnp.take_along_axis(clause, positions[:, None], axis=1)
    mask = mask[:, None, None, :]
    out, caches = self.layers.extend(x[:, None].astype(self.dtype), caches, write, mask)
    return self.norm(out[:, 0]), caches
