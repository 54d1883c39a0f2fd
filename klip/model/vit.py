"""ViT image tower: a patch stem, position embeddings, CLS token, Encoder; `pool` gives the
image's one vector (the CLS token, or the mean of the patch tokens: `model.pool` "gap").

Position embeddings (`model.posemb`): "learned" (a parameter per patch, ViT) or "sincos2d"
(fixed 2-D sine-cosine, no parameter; MoCo v3 and big_vision's plain ViT baselines, which
with global average pooling train faster from scratch on little data, Beyer et al. 2022).

Two stems (`model.stem`) turn the image into one token per patch:
- "patch": patchify by reshape and one linear embedding (ViT);
- "conv": log2(patch) 3x3 stride-2 convolutions, each followed by LayerNorm and GELU, then a
  linear map to the width (Xiao et al. 2021, "Early convolutions help transformers see
  better"). The convolutions share weights across positions and see across patch borders,
  which a linear patch embedding of 8x8x2 speckled pixels learns slowly from few images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klip.model import dense
from klip.model.layers import DENSE_INIT, ZEROS, Encoder, layer_norm, param

POSEMB_INIT = nnx.initializers.normal(stddev=0.02)
CONV_INIT = nnx.initializers.he_normal()
STEMS = ("patch", "conv")
POOLS = ("cls", "gap")
POSEMBS = ("learned", "sincos2d")


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


def sincos2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings [grid**2, width] in row-major patch order
  (MoCo v3; big_vision's `posemb_sincos_2d`): a quarter of the channels each for sin and cos
  of the row and of the column at geometric frequencies."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
  y, x = np.mgrid[:grid, :grid]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


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


class ConvStem(nnx.Module):
  """[B, H, W, C] -> [B, (H/p)*(W/p), width]: stride-2 3x3 convolutions down to the patch grid.

  Channels double at each stage and end at width / 2 (at least 16), then a linear map to the
  width; the output tokens are in the same row-major patch order as `patchify`.
  """

  def __init__(self, patch: int, channels: int, width: int, dtype, *, rngs: nnx.Rngs):
    stages = patch.bit_length() - 1
    if patch < 2 or 1 << stages != patch:
      raise ValueError(f"the conv stem needs a power-of-two patch_size, got {patch}")
    widths = [max(16, width >> (stages - i)) for i in range(stages)]
    self.convs = nnx.List()
    self.norms = nnx.List()
    for c_in, c_out in zip([channels] + widths[:-1], widths):
      self.convs.append(nnx.Conv(c_in, c_out, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                                 dtype=dtype,
                                 kernel_init=param(CONV_INIT, (None, None, None, None)),
                                 bias_init=param(ZEROS, (None,)), rngs=rngs))
      self.norms.append(nnx.LayerNorm(c_out, epsilon=1e-6, dtype=dtype,
                                      scale_init=param(nnx.initializers.ones_init(), (None,)),
                                      bias_init=param(ZEROS, (None,)), rngs=rngs))
    self.proj = nnx.Linear(widths[-1], width, dtype=dtype, rngs=rngs,
                           dot_general=dense.dot_general,
                           kernel_init=param(DENSE_INIT, ("patch", "embed")),
                           bias_init=param(ZEROS, ("embed",)))

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.gelu(norm(conv(x)))
    b, gh, gw, c = x.shape
    return self.proj(x.reshape(b, gh * gw, c))


class ViT(nnx.Module):
  """Vision Transformer over [B, H, W, C] SAR chips; returns [B, 1 + N, width], CLS first."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.grid = patch_grid(config)
    self.image_size = config.image_size
    self.patch_size = config.patch_size
    self.channels = config.channels
    self.dtype = jnp.dtype(config.dtype)
    vit = config.vit
    self.stem = config.stem
    if self.stem not in STEMS:
      raise ValueError(f"model.stem must be one of {STEMS}, got {self.stem!r}")
    if self.stem == "conv":
      self.conv_stem = ConvStem(config.patch_size, config.channels, vit.width, self.dtype,
                                rngs=rngs)
    else:
      patch_dim = config.patch_size * config.patch_size * config.channels
      self.patch_embed = nnx.Linear(patch_dim, vit.width, dtype=self.dtype, rngs=rngs,
                                    dot_general=dense.dot_general,
                                    kernel_init=param(DENSE_INIT, ("patch", "embed")),
                                    bias_init=param(ZEROS, ("embed",)))
    self.cls = nnx.Param(param(ZEROS, (None, "embed"))(rngs.params(), (1, vit.width)))
    self.cls_posemb = nnx.Param(
        param(POSEMB_INIT, (None, "embed"))(rngs.params(), (1, vit.width)))
    self.pool_type = config.pool
    if self.pool_type not in POOLS:
      raise ValueError(f"model.pool must be one of {POOLS}, got {self.pool_type!r}")
    self.posemb_type = config.posemb
    if self.posemb_type not in POSEMBS:
      raise ValueError(f"model.posemb must be one of {POSEMBS}, got {self.posemb_type!r}")
    if self.posemb_type == "learned":
      self.posemb = nnx.Param(
          param(POSEMB_INIT, ("length", "embed"))(rngs.params(), (self.grid ** 2, vit.width)))
    self.encoder = Encoder(vit.depth, vit.width, vit.heads, vit.mlp_dim,
                           scan=config.scan_layers, remat_policy=config.remat_policy,
                           dtype=self.dtype, attention=config.attention,
                           rngs=rngs)
    self.norm = layer_norm(vit.width, self.dtype, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    expected = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"expected images of shape [B, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}], got {tuple(images.shape)}")
    images = images.astype(self.dtype)
    if self.stem == "conv":
      x = self.conv_stem(images)
    else:
      x = self.patch_embed(patchify(images, self.patch_size))
    posemb = (self.posemb[...] if self.posemb_type == "learned"
              else sincos2d(self.grid, x.shape[-1]))  # sincos2d: a constant, not a parameter
    x = x + jnp.asarray(posemb).astype(self.dtype)
    cls = (self.cls[...] + self.cls_posemb[...]).astype(self.dtype)
    cls = jnp.broadcast_to(cls[None], (x.shape[0], 1, x.shape[-1]))
    x = self.encoder(jnp.concatenate([cls, x], axis=1))
    return self.norm(x)

  def pool(self, tokens: jax.Array) -> jax.Array:
    """The image's one vector [B, width] from its tokens [B, 1 + N, width] (`__call__`): the
    CLS token ("cls") or the mean of the patch tokens ("gap", global average pooling)."""
    return tokens[:, 0] if self.pool_type == "cls" else jnp.mean(tokens[:, 1:], axis=1)
