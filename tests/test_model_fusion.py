"""Tests of the KLIP model's fusion path (cross-attention, matching) and image-conditioned
decoder."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klip.model import layers
from klip.model import text as text_lib
from klip.model.two_tower import Model
from model_support import inputs, params_flat, tiny_config


def test_cross_attention_shapes():
  attention = layers.Attention(32, 4, kv_width=16, rngs=nnx.Rngs(0))
  x, kv = jnp.ones((2, 5, 32)), jnp.ones((2, 7, 16))
  mask = jnp.ones((2, 4, 5, 7), bool)
  assert attention(x, kv, mask).shape == (2, 5, 32)
  assert attention.key.kernel.shape == (16, 4, 8)


def test_fusion_changes_fused_output_but_not_contrastive_embeddings():
  config = tiny_config()
  fused_model = Model(config, rngs=nnx.Rngs(0))
  plain_model = Model(tiny_config(text=dict(config.text, fusion_layers=0)),
                      rngs=nnx.Rngs(1))
  assert plain_model.itm_head is None
  source = {path: var[...] for path, var in params_flat(fused_model)}
  nnx.update(plain_model, nnx.from_flat_state(
      [(path, var.replace(source[path])) for path, var in params_flat(plain_model)]))
  images, tokens = inputs(config)
  image_tokens = fused_model.encode_image(images)
  np.testing.assert_allclose(fused_model.embed_texts(tokens), plain_model.embed_texts(tokens),
                             atol=1e-6)
  np.testing.assert_allclose(fused_model.text(tokens), plain_model.text(tokens), atol=1e-6)
  fused = fused_model.text(tokens, image_tokens)
  assert not np.allclose(fused, fused_model.text(tokens), atol=1e-3)
  other = fused_model.text(tokens, image_tokens[::-1])  # the other image changes the output
  assert not np.allclose(fused[0], other[0], atol=1e-3)
  with pytest.raises(ValueError, match="no fusion path"):
    plain_model.match_logits(image_tokens, tokens)


def test_top_fusion_blocks_reuse_the_contrastive_lower_states():
  config = tiny_config(text=dict(tiny_config().text, fusion_layers=1))
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config, batch=3)
  image_tokens = model.encode_image(images)
  states = model.text_states(tokens)
  np.testing.assert_allclose(model.embed_text_states(states), model.embed_texts(tokens),
                             atol=1e-6)
  rows = jnp.array([2, 0, 0])  # e.g. hard-negative texts, gathered from the batch's states
  np.testing.assert_allclose(model.match_logits_states(image_tokens, states.take(rows)),
                             model.match_logits(image_tokens, tokens[rows]), atol=1e-5)
  # one text-only block below, one block with cross-attention on top
  assert [b.cross_attn is None for b in model.text.unimodal.blocks] == [True]
  assert [b.cross_attn is None for b in model.text.encoder.blocks] == [False]


def test_decoder_depth_zero_builds_no_decoder():
  config = tiny_config(decoder=dict(depth=0, context="caption"))
  model = Model(config, rngs=nnx.Rngs(0))
  assert model.decoder is None
  images, tokens = inputs(config)
  with pytest.raises(ValueError, match="decoder.depth is 0"):
    model.decode_logits(model.encode_image(images), tokens)


def test_match_and_decode_logits_shapes():
  config = tiny_config(decoder=dict(depth=3, context="caption"))
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config)
  image_tokens = model.encode_image(images)
  match = model.match_logits(image_tokens, tokens)
  assert match.shape == (2, 2) and match.dtype == jnp.float32
  logits = model.decode_logits(image_tokens, tokens)
  assert logits.shape == (2, 10, 50) and logits.dtype == jnp.float32
  assert model.decoder.layers.blocks[2].cross_attn is not None
  assert len(model.decoder.layers.blocks) == 3


def test_decoder_is_causal_and_ignores_padding():
  config = tiny_config()
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config)
  image_tokens = model.encode_image(images)
  logits = model.decode_logits(image_tokens, tokens)
  for t in (1, 4, 7):
    changed = model.decode_logits(image_tokens, tokens.at[:, t].set(9))
    np.testing.assert_allclose(changed[:, :t], logits[:, :t], atol=1e-5)
    assert not np.allclose(changed[1, t:], logits[1, t:], atol=1e-4)
  padded = jnp.pad(tokens, ((0, 0), (0, 2)), constant_values=config.text.pad_id)
  real = np.asarray(tokens != config.text.pad_id)
  np.testing.assert_allclose(model.decode_logits(image_tokens, padded)[:, :10][real],
                             logits[real], atol=1e-5)


# [DEC] a b | [SEP] c d e | [SEP] f [PAD] [PAD]: three clauses, padded (DEC 3, SEP 5)
CLAUSED = jnp.asarray([[3, 11, 12, 5, 13, 14, 15, 5, 16, 0, 0, 0],
                       [3, 21, 5, 22, 23, 5, 24, 25, 26, 27, 0, 0]], jnp.int32)


def test_clause_layout_starts_a_clause_at_dec_and_at_each_sep():
  clause, position = text_lib.clause_layout(CLAUSED)
  np.testing.assert_array_equal(clause[0], [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(position[0], [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(clause[1], [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(position[1], [0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6])


def test_clause_context_reads_the_image_and_its_own_clause_only():
  """With decoder.context "clause" a clause's states are those of the clause decoded alone
  (from its [SEP], at positions 0, 1, ...): other clauses' tokens do not reach it. With
  "caption" they do."""
  images = inputs(tiny_config())[0]
  for context in ("clause", "caption"):
    model = Model(tiny_config(decoder=dict(depth=2, context=context)), rngs=nnx.Rngs(0))
    image_tokens = model.encode_image(images)
    full = model.decode_states(image_tokens, CLAUSED)
    alone = model.decode_states(image_tokens[:1], CLAUSED[:1, 3:7])  # [SEP] c d e
    other = model.decode_states(image_tokens, CLAUSED.at[0, 1:3].set(40))  # clause 0 changed
    if context == "clause":
      np.testing.assert_allclose(alone[0], full[0, 3:7], atol=1e-5)
      np.testing.assert_allclose(other[0, 3:], full[0, 3:], atol=1e-5)
      np.testing.assert_allclose(other[1], full[1], atol=1e-5)
    else:
      assert not np.allclose(alone[0], full[0, 3:7], atol=1e-3)
      assert not np.allclose(other[0, 3:7], full[0, 3:7], atol=1e-3)
    # the image reaches every position either way
    swapped = model.decode_states(image_tokens[::-1], CLAUSED)
    assert not np.allclose(swapped[0, 3:7], full[0, 3:7], atol=1e-3)


@pytest.mark.parametrize("scan,context", [(False, "caption"), (True, "caption"),
                                          (False, "clause"), (True, "clause")])
def test_decoder_cache_extends_as_the_full_pass_would(scan, context):
  """prefill over a prompt, then one token at a time: the states of the causal full pass."""
  config = tiny_config(scan_layers=scan, decoder=dict(depth=2, context=context))
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config)
  tokens = CLAUSED[:, :10] if context == "clause" else tokens
  image_tokens = model.encode_image(images)
  full = model.decode_states(image_tokens, tokens)
  start, pad = 3, config.text.pad_id
  buf = tokens.at[:, start:].set(pad)
  states, caches = model.decode_prefill(image_tokens, buf)
  np.testing.assert_allclose(states[:, :start], full[:, :start], atol=1e-5)
  positions = jnp.asarray([start, start + 2])  # rows at different positions
  buf = buf.at[1, start:start + 2].set(tokens[1, start:start + 2])
  _, caches = model.decode_prefill(image_tokens, buf)
  for _ in range(tokens.shape[1] - start - 2):
    buf = buf.at[jnp.arange(2), positions].set(tokens[jnp.arange(2), positions])
    got, caches = model.decode_extend(buf, positions, caches)
    np.testing.assert_allclose(got, full[jnp.arange(2), positions], atol=1e-5)
    positions = positions + 1


def test_decoder_logits_are_tied_to_the_token_embedding():
  config = tiny_config()
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config)
  image_tokens = model.encode_image(images)
  states = model.decode_states(image_tokens, tokens)
  np.testing.assert_allclose(model.decode_logits(image_tokens, tokens),
                             states @ model.text.embed.embedding[...].T, atol=1e-5)
  assert not any("decoder" in path and "embed" in path for path, _ in params_flat(model))


def test_fusion_layers_must_fit_the_text_tower():
  with pytest.raises(ValueError, match=r"fusion_layers must be in \[0, text.depth=2\], got 3"):
    Model(tiny_config(text=dict(tiny_config().text, fusion_layers=3)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no cross-attention"):
    layers.Encoder(1, 16, 2, 32, rngs=nnx.Rngs(0))(jnp.ones((1, 2, 16)), kv=jnp.ones((1, 3, 16)))


def test_match_cosine_adds_the_scaled_contrastive_cosine_to_the_match_logit():
  """model.match_cosine: the match logit is the fused head's plus exp(itm_log_scale) times
  the pair's cosine, given by the caller or computed from the image tokens and text states;
  the no-match logit is the head's alone."""
  config = tiny_config(match_cosine=True)
  model = Model(config, rngs=nnx.Rngs(0))
  plain = Model(tiny_config(), rngs=nnx.Rngs(0))
  images, tokens = inputs(config, batch=3)
  image_tokens = model.encode_image(images)
  states = model.text_states(tokens)
  cosine = jnp.sum(model.embed_images(images) * model.embed_texts(tokens), axis=-1)
  with_cos = model.match_logits_states(image_tokens, states, cosine)
  np.testing.assert_allclose(model.match_logits_states(image_tokens, states), with_cos,
                             rtol=1e-5, atol=1e-5)
  head = plain.match_logits_states(image_tokens, states)  # same initialisation, no cosine
  scale = np.exp(float(model.itm_log_scale[...]))
  np.testing.assert_allclose(scale, 1 / config.temperature_init, rtol=1e-5)
  np.testing.assert_allclose(with_cos[:, 0], head[:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(with_cos[:, 1], head[:, 1] + scale * cosine, rtol=1e-5, atol=1e-5)
  # a pair whose cosine is higher gets the higher match logit, other things equal
  shifted = model.match_logits_states(image_tokens, states, cosine + 0.5)
  assert np.all(np.asarray(shifted[:, 1] - with_cos[:, 1]) > 0)
  assert plain.itm_log_scale is None
