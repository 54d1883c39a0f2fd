"""Tests of the KLIP model towers, the scanned/rematted encoder and parameter annotations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd as core_spmd

from klip import sharding
from klip.model import layers
from klip.model.two_tower import Model, count_params
from klip.model.vit import interpolate_posemb

ENC_ID = 1


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      image_size=16, patch_size=8, channels=2,
      vit=dict(width=32, depth=2, heads=4, mlp_dim=64),
      text=dict(vocab_size=50, max_len=12, width=32, depth=2, heads=4, mlp_dim=64, pad_id=0),
      embed_dim=16, temperature_init=0.07, dtype="float32",
      scan_layers=False, remat_policy="none"))
  config.update(overrides)
  return config


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, channels=2,
      vit=dict(width=768, depth=12, heads=12, mlp_dim=3072),
      text=dict(vocab_size=32000, max_len=128, width=768, depth=12, heads=12, mlp_dim=3072,
                pad_id=0),
      embed_dim=256, temperature_init=0.07, dtype="bfloat16",
      scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"))


def inputs(config, batch=2):
  images = jax.random.normal(jax.random.key(1), (batch, config.image_size, config.image_size,
                                                 config.channels))
  body = jax.random.randint(jax.random.key(2), (batch, 7), 2, config.text.vocab_size)
  tokens = jnp.concatenate([jnp.full((batch, 1), ENC_ID), body,
                            jnp.zeros((batch, 2), jnp.int32)], axis=1).astype(jnp.int32)
  return images, tokens.at[0, 5:].set(config.text.pad_id)


def params_flat(model):
  return nnx.to_flat_state(nnx.state(model, nnx.Param))


def copy_loop_params_to_scan(loop_model, scan_model):
  """Stacks the per-layer params of a looped model into the scanned model."""
  loop = {path: var[...] for path, var in params_flat(loop_model)}
  flat = []
  for path, var in params_flat(scan_model):
    if "blocks" in path:
      i = path.index("blocks") + 1
      value = jnp.stack([loop[path[:i] + (k,) + path[i:]] for k in range(var.shape[0])])
    else:
      value = loop[path]
    assert value.shape == var.shape, path
    flat.append((path, var.replace(value)))
  nnx.update(scan_model, nnx.from_flat_state(flat))


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


def test_scan_matches_loop_with_copied_params():
  config = tiny_config()
  loop_model = Model(config, rngs=nnx.Rngs(0))
  scan_model = Model(tiny_config(scan_layers=True), rngs=nnx.Rngs(1))
  kernel = scan_model.image.encoder.blocks.mlp.fc1.kernel
  assert kernel.shape == (2, 32, 64)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert not np.allclose(kernel[0], kernel[1])  # each layer gets its own rng split
  copy_loop_params_to_scan(loop_model, scan_model)
  images, tokens = inputs(config)
  for want, got in zip(loop_model(images, tokens), scan_model(images, tokens)):
    np.testing.assert_allclose(want, got, atol=1e-5)


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
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    got = jax.jit(lambda s, i, t: nnx.merge(graphdef, s)(i, t))(state, images, tokens)
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


def test_base_param_count():
  model = nnx.eval_shape(lambda: Model(base_config(), rngs=nnx.Rngs(0)))
  count = count_params(model)
  print(f"base model parameters: {count:,}")
  expected = 86e6 + 85e6 + 32000 * 768
  assert abs(count - expected) / expected < 0.1
  assert model.image.encoder.blocks.attn.query.kernel.shape == (12, 768, 12, 64)


def test_encoder_layers_standalone():
  encoder = layers.Encoder(3, 16, 2, 32, scan=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = jnp.ones((2, 1, 5, 5), bool).at[:, :, :, -1].set(False)
  out = encoder(x, mask)
  assert out.shape == x.shape
  changed = encoder(x.at[:, -1].set(9.0), mask)  # a masked key only changes its own query row
  np.testing.assert_allclose(out[:, :-1], changed[:, :-1], atol=1e-5)


def test_cross_attention_shapes():
  attention = layers.Attention(32, 4, kv_width=16, rngs=nnx.Rngs(0))
  x, kv = jnp.ones((2, 5, 32)), jnp.ones((2, 7, 16))
  mask = jnp.ones((2, 4, 5, 7), bool)
  assert attention(x, kv, mask).shape == (2, 5, 32)
  assert attention.key.kernel.shape == (16, 4, 8)
