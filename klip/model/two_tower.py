"""The KLIP model: two towers for contrast, a fusion path for matching, a decoder to reconstruct.

ViT + text encoder with linear projections and a learned temperature (contrast); the text
tower's top `text.fusion_layers` blocks with cross-attention to the image tokens and a 2-way
head (match, `POSITIVE` = match); an image-conditioned causal decoder whose logits are tied to
the token embedding (reconstruct).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klip import sharding
from klip.model import dense
from klip.model.layers import DENSE_INIT, ZEROS, param
from klip.model.text import TextDecoder, TextEncoder, TextStates, decoder_depth
from klip.model.vit import ViT

MAX_SCALE = 100.0
SIGMOID_BIAS_INIT = -10.0
POSITIVE = 1  # index of "match" in the ITM logits (0: no match)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit vectors along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _projection(width: int, embed_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(width, embed_dim, use_bias=False, dtype=jnp.float32, rngs=rngs,
                    dot_general=dense.dot_general,
                    kernel_init=param(DENSE_INIT, ("embed", "proj")))


class Model(nnx.Module):
  """Image and text towers projected to a shared unit sphere, plus the match head and decoder.

  Towers compute in `config.dtype`; projections, heads, normalisation and outputs are float32.
  With `text.fusion_layers` = 0 there is no fusion path (and no `itm_head`); with
  `decoder.depth` = 0 no decoder.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.image = ViT(config, rngs=rngs)
    self.text = TextEncoder(config, rngs=rngs)
    self.image_proj = _projection(config.vit.width, config.embed_dim, rngs)
    self.text_proj = _projection(config.text.width, config.embed_dim, rngs)
    init_scale = math.log(1.0 / config.temperature_init)
    self.logit_scale = nnx.Param(
        param(nnx.initializers.constant(init_scale), ())(rngs.params(), ()))
    # bias of the sigmoid (SigLIP) contrastive loss; unused by the softmax loss
    self.logit_bias = nnx.Param(
        param(nnx.initializers.constant(SIGMOID_BIAS_INIT), ())(rngs.params(), ()))
    self.itm_head = nnx.Linear(config.text.width, 2, dtype=jnp.float32, rngs=rngs,
                               dot_general=dense.dot_general,
                               kernel_init=param(DENSE_INIT, ("embed", None)),
                               bias_init=param(ZEROS, (None,))) if self.text.fusion else None
    # match_cosine: the pair's contrastive cosine, times a learned scale (log-parametrised,
    # starting at the temperature's), is added to the "match" logit of the fused head.
    self.match_cosine = bool(config.match_cosine) and self.itm_head is not None
    self.itm_log_scale = nnx.Param(
        param(nnx.initializers.constant(init_scale), ())(rngs.params(), ())
    ) if self.match_cosine else None
    self.decoder = TextDecoder(config, rngs=rngs) if decoder_depth(config) else None

  def encode_image(self, images: jax.Array) -> jax.Array:
    """ViT tokens [B, 1 + N, width], CLS first."""
    return self.image(images)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Text hidden states [B, L, width]."""
    return self.text(tokens)

  def image_embedding(self, image_tokens: jax.Array) -> jax.Array:
    """Unit-norm float32 image embeddings [B, embed_dim] from ViT tokens (pooled as
    `model.pool` says: the CLS token or the patch tokens' mean)."""
    return l2_normalize(self.image_proj(self.image.pool(image_tokens).astype(jnp.float32)))

  def embed_images(self, images: jax.Array) -> jax.Array:
    """Unit-norm float32 image embeddings [B, embed_dim] of images [B, H, W, C]."""
    return self.image_embedding(self.encode_image(images))

  def embed_texts(self, tokens: jax.Array) -> jax.Array:
    """Unit-norm float32 text embeddings [B, embed_dim] from position 0 (the [ENC] token)."""
    return self.embed_text_states(self.text.lower(tokens))

  def text_states(self, tokens: jax.Array) -> TextStates:
    """The text tower's states below its fusion blocks (shared by contrast and matching)."""
    return self.text.lower(tokens)

  def embed_text_states(self, states: TextStates) -> jax.Array:
    """`embed_texts` from `text_states`."""
    first = self.text.upper(states)[:, 0].astype(jnp.float32)
    return l2_normalize(self.text_proj(first))

  def temperature_scale(self) -> jax.Array:
    """exp(logit_scale), with logit_scale clipped to [0, log 100]."""
    return jnp.exp(jnp.clip(self.logit_scale[...], 0.0, math.log(MAX_SCALE)))

  def match_logits(self, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """ITM logits [B, 2] float32 (index POSITIVE: match) from the fused [ENC] token (and, with
    `model.match_cosine`, the pair's contrastive cosine)."""
    return self.match_logits_states(image_tokens, self.text.lower(tokens))

  def match_logits_states(self, image_tokens: jax.Array, states: TextStates,
                          cosine: jax.Array | None = None) -> jax.Array:
    """`match_logits` from `text_states`: only the fusion blocks run. `cosine` [B]: the pairs'
    contrastive cosines where the caller has them (with `model.match_cosine`; computed here
    otherwise, one more pass of the text tower's upper blocks without the image).

    With `model.match_cosine` the match logit is the fused head's plus scale * cosine: a model
    whose contrast already tells a caption from another starts its matching there, and the
    fusion blocks learn what the cosine misses (from scratch, the fused head alone stayed at
    its prior for the first ~600 steps of `tiny`, bench/README.md)."""
    if self.itm_head is None:
      raise ValueError("text.fusion_layers is 0: the model has no fusion path")
    fused = self.text.upper(states, image_tokens)[:, 0].astype(jnp.float32)
    logits = self.itm_head(fused)
    if not self.match_cosine:
      return logits
    if cosine is None:
      cosine = jnp.sum(self.image_embedding(image_tokens) * self.embed_text_states(states),
                       axis=-1)
    rise = jnp.exp(self.itm_log_scale[...]) * cosine.astype(jnp.float32)
    return logits.at[:, POSITIVE].add(rise)

  def _decoder_input(self, tokens: jax.Array) -> jax.Array:
    """The text tower's embeddings of `tokens` at the decoder's positions."""
    return self.text.embed_tokens(tokens, self.decoder.positions(tokens))

  def decode_states(self, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """Causal decoder hidden states [B, L, width] over `tokens` (which start with [DEC]).

    The input embedding (tokens + positions) is the text tower's, at the positions of
    `decoder.context` (in the caption or in the clause).
    """
    if self.decoder is None:
      raise ValueError("decoder.depth is 0: the model has no decoder")
    return self.decoder(self._decoder_input(tokens), tokens, image_tokens)

  def decode_prefill(self, image_tokens: jax.Array, tokens: jax.Array) -> tuple:
    """`decode_states` over a decoding buffer, and the decoder's key/value caches for
    `decode_extend` (cross-attention keys and values of the image tokens computed once)."""
    if self.decoder is None:
      raise ValueError("decoder.depth is 0: the model has no decoder")
    return self.decoder.prefill(self._decoder_input(tokens), tokens, image_tokens)

  def decode_extend(self, tokens: jax.Array, positions: jax.Array, caches) -> tuple:
    """Decoder states [B, width] at `positions` [B] of the buffer `tokens` [B, L] from the
    caches of the positions before (`decode_prefill`, then earlier `decode_extend`s): equal to
    `decode_states(...)[b, positions[b]]` at the cost of one token. Returns (states, caches)."""
    new = jnp.take_along_axis(tokens, positions[:, None], axis=1)[:, 0]
    at = jnp.take_along_axis(self.decoder.positions(tokens), positions[:, None], axis=1)[:, 0]
    return self.decoder.extend(self.text.embed_at(new, at), tokens, positions, caches)

  def token_logits(self, states: jax.Array) -> jax.Array:
    """Float32 vocabulary logits [..., vocab], tied to the text tower's token embedding.

    The product runs in the compute dtype (bf16 operands in bf16 models; float32 models are
    unchanged) and is cast to float32 for the loss: computed in float32 it runs as three tf32
    GEMMs on NVIDIA GPUs."""
    dtype = self.text.dtype
    table = self.text.embed.embedding[...].astype(dtype)
    return jnp.einsum("...d,vd->...v", states.astype(dtype), table).astype(jnp.float32)

  def decode_logits(self, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token logits [B, L, vocab] float32: logits at t predict token t + 1."""
    logits = self.token_logits(self.decode_states(image_tokens, tokens))
    return sharding.constrain(logits, ("batch", "length", "vocab"))

  def __call__(self, images: jax.Array, tokens: jax.Array):
    """(image embeddings, text embeddings, logit scale)."""
    return self.embed_images(images), self.embed_texts(tokens), self.temperature_scale()


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on abstract models from nnx.eval_shape)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
