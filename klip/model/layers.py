"""Transformer building blocks: MLP, attention, pre-LayerNorm block and the block stack.

Blocks optionally cross-attend to another token sequence (the image tokens, for matching and
decoding); the cross-attention sublayer runs only when those tokens are passed.

Every parameter carries logical axis names (see `klip.sharding`); the residual stream is
constrained to ("batch", "length", "embed") at block boundaries. `Encoder` runs its blocks as
a Python loop or, with `scan=True`, as one `nnx.scan` over parameters stacked along a leading
"layers" axis; either way each block can be rematerialised with a `jax.checkpoint_policies`
policy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from klip import sharding

RESIDUAL = ("batch", "length", "embed")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
LAYERS = {nnx.PARTITION_NAME: "layers"}

DENSE_INIT = nnx.initializers.xavier_uniform()
ZEROS = nnx.initializers.zeros_init()
ONES = nnx.initializers.ones_init()


def param(init, names):
  """An initializer whose Param carries the logical axis `names`.

  Eager sharding is off: the names are logical, and placement on a mesh is done by the
  caller with `sharding.state_shardings` (e.g. as the out_shardings of a jitted init).
  """
  return nnx.with_partitioning(init, names, eager_sharding=False)


def layer_norm(width: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last ("embed") axis with named scale and bias."""
  return nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype,
                       scale_init=param(ONES, ("embed",)), bias_init=param(ZEROS, ("embed",)),
                       rngs=rngs)


class Mlp(nnx.Module):
  """Two dense layers with an exact GELU in between."""

  def __init__(self, width: int, mlp_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs,
                          kernel_init=param(DENSE_INIT, ("embed", "mlp")),
                          bias_init=param(ZEROS, ("mlp",)))
    self.fc2 = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs,
                          kernel_init=param(DENSE_INIT, ("mlp", "embed")),
                          bias_init=param(ZEROS, ("embed",)))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x), approximate=False)
    return self.fc2(sharding.constrain(h, ("batch", "length", "mlp")))


class Attention(nnx.Module):
  """Multi-head attention: queries from `x`, keys and values from `kv` (default `x`).

  `kv_width` is the feature size of `kv` when it differs from `width` (cross-attention).
  """

  def __init__(self, width: int, heads: int, *, kv_width: int | None = None,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"attention width {width} is not divisible by {heads} heads")
    head_dim = width // heads

    def heads_in(features):
      return nnx.LinearGeneral(features, (heads, head_dim), dtype=dtype, rngs=rngs,
                               kernel_init=param(DENSE_INIT, ("embed", "heads", "kv")),
                               bias_init=param(ZEROS, ("heads", "kv")))

    self.query = heads_in(width)
    self.key = heads_in(kv_width or width)
    self.value = heads_in(kv_width or width)
    self.out = nnx.LinearGeneral((heads, head_dim), width, axis=(-2, -1), dtype=dtype,
                                 rngs=rngs,
                                 kernel_init=param(DENSE_INIT, ("heads", "kv", "embed")),
                                 bias_init=param(ZEROS, ("embed",)))

  def __call__(self, x: jax.Array, kv: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """x [B, Lq, D], kv [B, Lk, Dkv], boolean mask [B, 1 or H, Lq, Lk] (True = attend)."""
    kv = x if kv is None else kv
    heads = ("batch", "length", "heads", "kv")
    q = sharding.constrain(self.query(x), heads)
    k = sharding.constrain(self.key(kv), heads)
    v = sharding.constrain(self.value(kv), heads)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.out(out)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block with an optional cross-attention sublayer.

  x + attn(ln(x)); with `cross_width` (the feature size of the attended tokens) then
  x + cross_attn(ln(x), kv) whenever `kv` is given (skipped otherwise); then x + mlp(ln(x)).
  """

  def __init__(self, width: int, heads: int, mlp_dim: int, *, cross_width: int | None = None,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, dtype, rngs)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    if cross_width:
      self.norm_cross = layer_norm(width, dtype, rngs)
      self.cross_attn = Attention(width, heads, kv_width=cross_width, dtype=dtype, rngs=rngs)
    else:
      self.cross_attn = None
    self.norm2 = layer_norm(width, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, kv: jax.Array | None = None,
               kv_mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.norm1(x), mask=mask)
    if kv is not None and self.cross_attn is not None:
      x = x + self.cross_attn(self.norm_cross(x), kv, kv_mask)
    x = x + self.mlp(self.norm2(x))
    return sharding.constrain(x, RESIDUAL)


def _apply_unit(unit: Block, x: jax.Array, mask: jax.Array | None,
                kv: jax.Array | None, kv_mask: jax.Array | None) -> jax.Array:
  return unit(x, mask, kv, kv_mask)


def check_remat_policy(policy: str) -> None:
  """Raises ValueError unless `policy` is one of REMAT_POLICIES."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; expected one of {REMAT_POLICIES}")


def rematted(fn, policy: str):
  """`fn` wrapped in `nnx.remat` with the named policy ('none': unchanged).

  'full' saves nothing (jax.checkpoint's default); the others name a
  `jax.checkpoint_policies` member.
  """
  check_remat_policy(policy)
  if policy == "none":
    return fn
  checkpoint_policy = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
  return nnx.remat(fn, policy=checkpoint_policy)


class Encoder(nnx.Module):
  """A stack of `depth` Blocks, looped in Python or scanned over stacked parameters.

  With `cross_width`, every layer cross-attends to the `kv` tokens passed at call time; without
  `kv` the cross-attention sublayers are skipped.

  With `scan=True` the blocks are created by `nnx.vmap` (one rng split per block), so every
  parameter has a leading axis of size `depth` named "layers".
  """

  def __init__(self, depth: int, width: int, heads: int, mlp_dim: int, *,
               cross_width: int | None = None, scan: bool = False,
               remat_policy: str = "none", dtype=jnp.float32, rngs: nnx.Rngs):
    check_remat_policy(remat_policy)
    self.scan = scan
    self.remat_policy = remat_policy
    self.cross = bool(cross_width)
    if depth < 1:
      raise ValueError(f"an Encoder needs depth >= 1, got {depth}")
    make_unit = functools.partial(Block, width, heads, mlp_dim, cross_width=cross_width,
                                  dtype=dtype)
    if scan:
      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
      def make_stack(rngs: nnx.Rngs):
        return make_unit(rngs=rngs)

      self.blocks = make_stack(rngs)
    else:
      self.blocks = nnx.List([make_unit(rngs=rngs) for _ in range(depth)])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, kv: jax.Array | None = None,
               kv_mask: jax.Array | None = None) -> jax.Array:
    """x [B, L, D]; kv [B, Lk, cross_width] and kv_mask [B, 1 or H, L, Lk] for cross-attention."""
    if kv is not None and not self.cross:
      raise ValueError("this Encoder has no cross-attention; kv must be None")
    x = sharding.constrain(x, RESIDUAL)
    step = rematted(_apply_unit, self.remat_policy)
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None), out_axes=nnx.Carry,
                transform_metadata=LAYERS)
      def scan_blocks(x, unit, mask, kv, kv_mask):
        return step(unit, x, mask, kv, kv_mask)

      return scan_blocks(x, self.blocks, mask, kv, kv_mask)
    for unit in self.blocks:
      x = step(unit, x, mask, kv, kv_mask)
    return x
