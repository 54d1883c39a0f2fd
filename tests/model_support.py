"""Small model configs and inputs shared by the model tests."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx


ENC_ID = 1


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      image_size=16, patch_size=8, channels=2,
      vit=dict(width=32, depth=2, heads=4, mlp_dim=64),
      text=dict(vocab_size=50, max_len=12, width=32, depth=2, heads=4, mlp_dim=64, pad_id=0,
                fusion_layers=2),
      decoder=dict(depth=2, context="caption"), stem="patch", pool="cls", posemb="learned",
      match_cosine=False,
      attention="auto",
      embed_dim=16, temperature_init=0.07, dtype="float32",
      scan_layers=False, remat_policy="none"))
  config.update(overrides)
  return config


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, channels=2,
      vit=dict(width=768, depth=12, heads=12, mlp_dim=3072),
      text=dict(vocab_size=32000, max_len=128, width=768, depth=12, heads=12, mlp_dim=3072,
                pad_id=0, fusion_layers=12),
      decoder=dict(depth=12, context="caption"), stem="patch", pool="cls", posemb="learned",
      match_cosine=False,
      attention="auto",
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
