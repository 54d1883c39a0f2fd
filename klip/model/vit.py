"""ViT image tower: patchify by reshape, linear patch embedding, CLS token, Encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klip.model import dense
from klip.model.layers import DENSE_INIT, ZEROS, Encoder, layer_norm, param

POSEMB_INIT = nnx.initializers.normal(stddev=0.02)


def patch_grid(config) -> int:
  """Patches per side; raises ValueError unless the image size is a multiple of the patch."""
  if config.image_size <= 0 or config.patch_size <= 0 or config.image_size % config.patch_size:
    raise ValueError(f"image_size {config.image_size} must be a positive multiple of "
                     f"patch_size {config.patch_size}")
  return config.image_size // config.patch_size


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def interpolate_posemb(posemb: np.ndarray | jax.Array, old_grid: int,
                       new_grid: int) -> jax.Array:
  """Bilinearly resizes patch-grid position embeddings [old_grid**2, D] -> [new_grid**2, D]."""
  posemb = jnp.asarray(posemb)
  if posemb.ndim != 2 or posemb.shape[0] != old_grid * old_grid:
    raise ValueError(f"posemb of shape {posemb.shape} is not a [{old_grid}**2, D] grid")
  if old_grid == new_grid:
    return posemb
  width = posemb.shape[1]
  grid = posemb.reshape(old_grid, old_grid, width)
  grid = jax.image.resize(grid, (new_grid, new_grid, width), method="bilinear")
  return grid.reshape(new_grid * new_grid, width)


class ViT(nnx.Module):
  """Vision Transformer over [B, H, W, C] SAR chips; returns [B, 1 + N, width], CLS first."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.grid = patch_grid(config)
    self.image_size = config.image_size
    self.patch_size = config.patch_size
    self.channels = config.channels
    self.dtype = jnp.dtype(config.dtype)
    vit = config.vit
    patch_dim = config.patch_size * config.patch_size * config.channels
    self.patch_embed = nnx.Linear(patch_dim, vit.width, dtype=self.dtype, rngs=rngs,
                                  dot_general=dense.dot_general,
                                  kernel_init=param(DENSE_INIT, ("patch", "embed")),
                                  bias_init=param(ZEROS, ("embed",)))
    self.cls = nnx.Param(param(ZEROS, (None, "embed"))(rngs.params(), (1, vit.width)))
    self.cls_posemb = nnx.Param(
        param(POSEMB_INIT, (None, "embed"))(rngs.params(), (1, vit.width)))
    self.posemb = nnx.Param(
        param(POSEMB_INIT, ("length", "embed"))(rngs.params(), (self.grid ** 2, vit.width)))
    self.encoder = Encoder(vit.depth, vit.width, vit.heads, vit.mlp_dim,
                           scan=config.scan_layers, remat_policy=config.remat_policy,
                           dtype=self.dtype, attention=config.get("attention", "auto"),
                           rngs=rngs)
    self.norm = layer_norm(vit.width, self.dtype, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    expected = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"expected images of shape [B, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}], got {tuple(images.shape)}")
    x = self.patch_embed(patchify(images, self.patch_size).astype(self.dtype))
    x = x + self.posemb[...].astype(self.dtype)
    cls = (self.cls[...] + self.cls_posemb[...]).astype(self.dtype)
    cls = jnp.broadcast_to(cls[None], (x.shape[0], 1, x.shape[-1]))
    x = self.encoder(jnp.concatenate([cls, x], axis=1))
    return self.norm(x)
