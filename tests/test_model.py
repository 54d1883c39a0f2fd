"""Tests of the KLIP model towers: shapes, scanned/rematted encoder, sharding, attention,
stems and pooling, parameter annotations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd as core_spmd

from klip import sharding
from klip.model import dense, layers, vit
from klip.model.two_tower import Model, count_params
from klip.model.vit import interpolate_posemb
from model_support import base_config, copy_loop_params_to_scan, inputs, params_flat, tiny_config


def test_output_shapes_and_unit_norms():
  config = tiny_config()
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config)
  assert model.encode_image(images).shape == (2, 1 + 4, 32)
  assert model.encode_text(tokens).shape == (2, 10, 32)
  zimg, ztxt, scale = model(images, tokens)
  assert zimg.shape == ztxt.shape == (2, 16)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)


def test_temperature_scale_is_clamped():
  model = Model(tiny_config(), rngs=nnx.Rngs(0))
  model.logit_scale[...] = jnp.asarray(10.0)
  np.testing.assert_allclose(model.temperature_scale(), 100.0, rtol=1e-5)
  model.logit_scale[...] = jnp.asarray(-3.0)
  np.testing.assert_allclose(model.temperature_scale(), 1.0, rtol=1e-6)


def test_text_embedding_ignores_padding():
  config = tiny_config()
  model = Model(config, rngs=nnx.Rngs(0))
  _, tokens = inputs(config)
  padded = jnp.pad(tokens, ((0, 0), (0, 2)), constant_values=config.text.pad_id)
  np.testing.assert_allclose(model.embed_texts(tokens), model.embed_texts(padded), atol=1e-5)
  changed = tokens.at[0, -1].set(7)  # a real token where there was padding changes it
  assert not np.allclose(model.embed_texts(tokens)[0], model.embed_texts(changed)[0], atol=1e-5)


@pytest.mark.parametrize("fusion", [2, 1])
def test_scan_matches_loop_with_copied_params(fusion):
  config = tiny_config(text=dict(tiny_config().text, fusion_layers=fusion))
  loop_model = Model(config, rngs=nnx.Rngs(0))
  scan_config = ml_collections.ConfigDict(config.to_dict())
  scan_config.scan_layers = True
  scan_model = Model(scan_config, rngs=nnx.Rngs(1))
  kernel = scan_model.image.encoder.blocks.mlp.fc1.kernel
  assert kernel.shape == (2, 32, 64)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert not np.allclose(kernel[0], kernel[1])  # each layer gets its own rng split
  # the top `fusion` blocks have cross-attention; the ones below are text-only
  assert scan_model.text.encoder.blocks.cross_attn.key.kernel.shape == (fusion, 32, 4, 8)
  unimodal = scan_model.text.unimodal
  assert (unimodal is None) == (fusion == 2)
  if unimodal is not None:
    assert unimodal.blocks.cross_attn is None
    assert unimodal.blocks.mlp.fc1.kernel.shape == (2 - fusion, 32, 64)
  copy_loop_params_to_scan(loop_model, scan_model)
  images, tokens = inputs(config)
  for want, got in zip(loop_model(images, tokens), scan_model(images, tokens)):
    np.testing.assert_allclose(want, got, atol=1e-5)
  image_tokens = loop_model.encode_image(images)
  for fn in ("match_logits", "decode_logits"):
    want = getattr(loop_model, fn)(image_tokens, tokens)
    np.testing.assert_allclose(want, getattr(scan_model, fn)(image_tokens, tokens), atol=1e-5)


def test_remat_does_not_change_outputs_or_grads():
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  mask = jnp.ones((2, 1, 1, 6), bool).at[0, ..., -2:].set(False)

  def loss_and_grads(scan, policy):
    encoder = layers.Encoder(2, 32, 4, 64, scan=scan, remat_policy=policy, rngs=nnx.Rngs(0))
    loss_fn = lambda encoder, x: jnp.sum(jnp.sin(encoder(x, mask)))
    return nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1)))(encoder, x)

  for scan in (True, False):
    want_loss, want_grads = loss_and_grads(scan, "none")
    for policy in layers.REMAT_POLICIES[1:]:
      loss, grads = loss_and_grads(scan, policy)
      np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   grads, want_grads)


def test_bfloat16_forward_close_to_float32():
  config = tiny_config()
  images, tokens = inputs(config)
  f32 = Model(config, rngs=nnx.Rngs(0))
  bf16 = Model(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32 for _, v in params_flat(bf16))
  assert bf16.encode_image(images).dtype == jnp.bfloat16
  assert bf16.encode_text(tokens).dtype == jnp.bfloat16
  for want, got in zip(f32(images, tokens), bf16(images, tokens)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(want, got, atol=0.05)
  # the decoder's vocabulary product runs on bf16 operands and comes out float32
  want = f32.decode_logits(f32.encode_image(images), tokens)
  got = bf16.decode_logits(bf16.encode_image(images), tokens)
  assert got.dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(bf16.token_logits)(jnp.ones((2, config.text.width), jnp.bfloat16)))
  assert f"bf16[2,{config.text.vocab_size}] = dot_general" in jaxpr, jaxpr
  np.testing.assert_allclose(want, got, atol=0.1 * float(np.abs(want).max()))


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
  model = Model(tiny_config(scan_layers=scan), rngs=nnx.Rngs(0))
  flat = params_flat(model)
  assert len(flat) > 20
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, path
    assert len(names) == var.ndim, (path, names, var.shape)
    if scan and "blocks" in path:
      assert names[0] == "layers", path


def test_sharded_forward_matches_unsharded():
  config = tiny_config(scan_layers=True, remat_policy="full")
  images, tokens = inputs(config, batch=8)
  model = Model(config, rngs=nnx.Rngs(0))
  want = model(images, tokens)
  mesh = sharding.make_mesh({"slice": 1, "data": 1, "fsdp": -1, "tensor": 1})
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor"), ("vocab", "tensor"))
  graphdef, state = nnx.split(model)
  image_tokens = model.encode_image(images)
  want += (model.match_logits(image_tokens, tokens), model.decode_logits(image_tokens, tokens))

  def forward(state, images, tokens):
    model = nnx.merge(graphdef, state)
    image_tokens = model.encode_image(images)
    return model(images, tokens) + (model.match_logits(image_tokens, tokens),
                                    model.decode_logits(image_tokens, tokens))

  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    got = jax.jit(forward)(state, images, tokens)
  for w, g in zip(want, got):
    np.testing.assert_allclose(w, g, atol=1e-5)


def test_interpolate_posemb():
  posemb = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
  np.testing.assert_array_equal(interpolate_posemb(posemb, 4, 4), posemb)
  assert interpolate_posemb(posemb, 4, 6).shape == (36, 8)
  constant = np.ones((16, 8), np.float32)
  np.testing.assert_allclose(interpolate_posemb(constant, 4, 2), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="grid"):
    interpolate_posemb(posemb, 5, 6)


def test_config_validation_errors():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    Model(tiny_config(image_size=20), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="remat_policy"):
    Model(tiny_config(remat_policy="everything"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not divisible"):
    Model(tiny_config(vit=dict(width=30, depth=1, heads=4, mlp_dim=8)), rngs=nnx.Rngs(0))
  config = tiny_config()
  model = Model(config, rngs=nnx.Rngs(0))
  images, tokens = inputs(config)
  with pytest.raises(ValueError, match="expected images"):
    model.embed_images(images[..., :1])
  with pytest.raises(ValueError, match="expected images"):
    model.embed_images(jnp.zeros((2, 24, 24, 2)))
  with pytest.raises(ValueError, match="max_len"):
    model.embed_texts(jnp.ones((2, config.text.max_len + 1), jnp.int32))
  with pytest.raises(ValueError, match="decoder.context must be one of"):
    Model(tiny_config(decoder=dict(depth=1, context="sentence")), rngs=nnx.Rngs(0))


def test_base_param_count():
  config = base_config()
  model = nnx.eval_shape(lambda: Model(config, rngs=nnx.Rngs(0)))
  count = count_params(model)
  print(f"base model parameters: {count:,}")
  w, depth, vocab, max_len = 768, 12, 32000, 128
  attn = 4 * (w * w + w)                           # q, k, v, out with biases
  block = attn + (8 * w * w + 5 * w) + 2 * 2 * w   # + MLP (4w hidden) + two LayerNorms
  cross = attn + 2 * w                             # cross-attention (kv width 768) + its LN
  vit = (16 * 16 * 2 + 1) * w + (2 + 14 * 14) * w + depth * block + 2 * w
  text = (vocab + max_len) * w + depth * (block + cross) + 2 * w
  decoder = depth * (block + cross) + 2 * w        # embedding shared with the text tower
  heads = 2 * w * 256 + 2 + (w + 1) * 2  # projections, temperature, sigmoid bias, ITM head
  assert count == vit + text + decoder + heads     # ~86M + 138M + 113M = ~338M
  assert model.image.encoder.blocks.attn.query.kernel.shape == (12, 768, 12, 64)
  assert model.text.encoder.blocks.cross_attn.key.kernel.shape == (12, 768, 12, 64)


def test_encoder_layers_standalone():
  encoder = layers.Encoder(3, 16, 2, 32, scan=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = jnp.ones((2, 1, 5, 5), bool).at[:, :, :, -1].set(False)
  out = encoder(x, mask)
  assert out.shape == x.shape
  changed = encoder(x.at[:, -1].set(9.0), mask)  # a masked key only changes its own query row
  np.testing.assert_allclose(out[:, :-1], changed[:, :-1], atol=1e-5)


@pytest.mark.parametrize("mask_heads,empty_row", [(None, False), (1, False), (4, False),
                                                   (4, True)])
def test_attention_equals_jax_reference(mask_heads, empty_row):
  """The heads-major attention computes jax.nn.dot_product_attention's maths, gradients too
  (its backward pass is written by hand), also for a query row whose keys are all masked."""
  kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (2, 5, 4, 8))
  k, v = jax.random.normal(kk, (2, 7, 4, 8)), jax.random.normal(kv, (2, 7, 4, 8))
  mask = None
  if mask_heads:
    mask = jax.random.bernoulli(km, 0.7, (2, mask_heads, 5, 7)).at[..., 0].set(True)
  if empty_row:
    mask = mask.at[1, 2, 3].set(False)
  ours = lambda q, k, v: layers.dot_product_attention(q, k, v, mask)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for g, g_ref in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v),
                      jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = ours(*half)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref(q, k, v), atol=0.05)
  for g, g_ref in zip(jax.grad(loss(ours), (0, 1, 2))(*half),
                      jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), g_ref, atol=0.03)


@pytest.mark.parametrize("lengths,mask_shape", [
    ((5, 7), None), ((6, 7), (2, 1, 1, -1)), ((5, 6), (2, 4, -2, -1)), ((5, 7), (2, 4, -2, -1)),
    ((6, 8), (2, 1, 1, -1))])
def test_cudnn_attention_padding_keeps_the_maths(monkeypatch, lengths, mask_shape):
  """cuDNN's attention pads odd lengths by one (an unattended key, a dropped query row): run
  through the XLA kernel in cuDNN's place (no GPU here), outputs and gradients are the
  unpadded attention's, and what reaches the kernel has even lengths."""
  lq, lk = lengths
  kq, kk, kv, km = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(kq, (2, lq, 4, 8))
  k, v = jax.random.normal(kk, (2, lk, 4, 8)), jax.random.normal(kv, (2, lk, 4, 8))
  mask = None
  if mask_shape:
    shape = tuple({-1: lk, -2: lq}.get(n, n) for n in mask_shape)
    mask = jax.random.bernoulli(km, 0.7, shape).at[..., 0].set(True)
  seen = []
  xla_attention = jax.nn.dot_product_attention

  def fake_cudnn(q, k, v, *, mask=None, key_value_seq_lengths=None, implementation=None):
    assert implementation == "cudnn"
    seen.append((q.shape[1], k.shape[1]))
    return xla_attention(q, k, v, mask=mask, key_value_seq_lengths=key_value_seq_lengths,
                         implementation="xla")

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  ours = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "cudnn")
  ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "xla")
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for g, g_ref in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v),
                      jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)
  assert seen and all(a % 2 == 0 and b % 2 == 0 for a, b in seen), seen


def test_attention_implementation_is_resolved_and_checked():
  """'auto' takes XLA's kernel off NVIDIA GPUs and in float32; 'cudnn' refuses float32."""
  assert layers.Attention(32, 4, rngs=nnx.Rngs(0)).implementation == "xla"
  expected = "cudnn" if "nvidia" in jax.devices()[0].device_kind.lower() else "xla"
  assert layers.resolve_attention("auto", jnp.bfloat16) == expected
  assert layers.resolve_attention("auto", jnp.float32) == "xla"
  with pytest.raises(ValueError, match="cudnn.*bfloat16"):
    layers.Attention(32, 4, implementation="cudnn", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    layers.Attention(32, 4, implementation="flash", rngs=nnx.Rngs(0))


def test_every_dense_layer_takes_the_row_major_weight_gradient():
  """The model's dense layers (towers, fusion, decoder, projections, matching head) all use
  `dense.dot_general` (tests/test_dense.py)."""
  config = tiny_config(text=dict(tiny_config().text, fusion_layers=1))
  model = Model(config, rngs=nnx.Rngs(0))
  linears = [node for _, node in nnx.iter_graph(model)
             if isinstance(node, (nnx.Linear, nnx.LinearGeneral))]
  assert len(linears) > 20
  assert all(node.dot_general is dense.dot_general for node in linears), [
      type(node).__name__ for node in linears if node.dot_general is not dense.dot_general]


def test_conv_stem_tokens_follow_the_patch_grid():
  """The conv stem gives one token per patch in patchify's row-major order: a change inside the
  patch at row 1, column 1 (pixels 8-15) reaches only the tokens whose receptive field holds
  it: three stride-2 3x3 convolutions (padding 1) see pixels 8j-7 .. 8j+7 for token j per axis,
  so patch 1 reaches tokens 1 and 2 along each axis."""
  config = tiny_config(image_size=64, stem="conv")
  model = Model(config, rngs=nnx.Rngs(0))
  stem = model.image.conv_stem
  images, _ = inputs(config)
  tokens = stem(images)
  assert tokens.shape == (2, 64, 32)
  moved = stem(images.at[:, 8:16, 8:16].add(5.0))
  change = np.abs(np.asarray(moved - tokens)).sum(axis=(0, 2))
  assert np.flatnonzero(change).tolist() == [9, 10, 17, 18]
  out = model.encode_image(images)
  assert out.shape == (2, 1 + 64, 32) and np.all(np.isfinite(out))


def test_conv_stem_needs_a_power_of_two_patch_and_a_known_stem():
  with pytest.raises(ValueError, match="power-of-two"):
    Model(tiny_config(image_size=24, patch_size=12, stem="conv"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.stem"):
    Model(tiny_config(stem="pixels"), rngs=nnx.Rngs(0))


def test_gap_pooling_and_sincos_position_embeddings():
  """model.pool = "gap" embeds the mean of the patch tokens (the CLS token is left out);
  model.posemb = "sincos2d" adds fixed 2-D sine-cosine embeddings and has no parameter."""
  config = tiny_config(pool="gap", posemb="sincos2d")
  model = Model(config, rngs=nnx.Rngs(0))
  images, _ = inputs(config)
  tokens = model.encode_image(images)
  np.testing.assert_allclose(model.image.pool(tokens), tokens[:, 1:].mean(axis=1), rtol=1e-6)
  expected = model.image_proj(tokens[:, 1:].mean(axis=1))
  expected = expected / jnp.linalg.norm(expected, axis=-1, keepdims=True)
  np.testing.assert_allclose(model.embed_images(images), expected, rtol=1e-5, atol=1e-6)
  names = {"/".join(map(str, p)) for p, _ in params_flat(model)}
  assert "image/posemb" not in names and "image/cls" in names
  learned = Model(tiny_config(), rngs=nnx.Rngs(0))
  assert count_params(learned) - count_params(model) == 4 * config.vit.width  # 2x2 grid
  table = vit.sincos2d(4, 8)
  assert table.shape == (16, 8)
  np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # row 0, column 0
  assert len({tuple(r) for r in np.round(table, 5)}) == 16  # every position its own code
  with pytest.raises(ValueError, match="model.pool"):
    Model(tiny_config(pool="max"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.posemb"):
    Model(tiny_config(posemb="rope"), rngs=nnx.Rngs(0))
