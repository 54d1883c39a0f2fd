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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from klip import sharding
from klip.model import dense

RESIDUAL = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "kv")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
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
  """Two dense layers with a GELU in between, in its tanh form (Flax's and big_vision's default):
  on CPU XLA computes it much faster than the exact form (bench/README.md, B1)."""

  def __init__(self, width: int, mlp_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs, dot_general=dense.dot_general,
                          kernel_init=param(DENSE_INIT, ("embed", "mlp")),
                          bias_init=param(ZEROS, ("mlp",)))
    self.fc2 = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs, dot_general=dense.dot_general,
                          kernel_init=param(DENSE_INIT, ("mlp", "embed")),
                          bias_init=param(ZEROS, ("embed",)))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x), approximate=True)
    return self.fc2(sharding.constrain(h, ("batch", "length", "mlp")))


def resolve_attention(implementation: str, dtype) -> str:
  """The attention kernel, 'xla' or 'cudnn', for the config's `implementation` and compute
  `dtype`: 'auto' takes cuDNN's fused attention where it runs (NVIDIA GPUs, bfloat16 or
  float16), else XLA's. Raises ValueError for an unknown name, or 'cudnn' in float32."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if implementation == "cudnn" and not half:
    raise ValueError(f"attention 'cudnn' (NVIDIA GPUs) needs model.dtype bfloat16 or float16, "
                     f"got {jnp.dtype(dtype).name}")
  if implementation == "auto":
    device = jax.devices()[0]
    nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()
    return "cudnn" if nvidia and half else "xla"
  return implementation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, implementation: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over q [B, Lq, H, d], k and v [B, Lk, H, d]; boolean `mask`
  [B, 1 or H, 1 or Lq, Lk] (True = attend). Result in v's dtype.

  'xla': `jax.nn.dot_product_attention`'s maths (logits and softmax in float32) computed
  heads-major, in flash attention's order (`_attend`). jax's XLA path reshapes to a
  grouped-query layout whose backward pass copies [B, H, Lq, Lk] arrays in 5-D layouts, and
  normalises the probabilities before the second matmul; on CPU this form is the faster one
  (bench/README.md).
  'cudnn': cuDNN's fused (flash) attention, NVIDIA GPUs only (`cudnn_attention`).
  """
  if implementation == "cudnn":
    return cudnn_attention(q, k, v, mask)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, d]
  return _attend(q, k, v, mask).transpose(0, 2, 1, 3)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _attention_parts(q, k, v, mask):
  """Heads-major attention: the output, the unnormalised probabilities
  exp((logits - row max) / sqrt(d)) in v's dtype, and 1 / their row sums (float32, [..., 1]).

  The row sums divide the [B, H, Lq, d] output, not the [B, H, Lq, Lk] probabilities: one
  pass less over the largest array, and the scale rides in the exponential's pass.
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASKED)
  scale = q.shape[-1] ** -0.5
  e = jnp.exp((logits - jnp.max(logits, axis=-1, keepdims=True)) * scale)
  inv_sum = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
  e = e.astype(v.dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", e, v, preferred_element_type=jnp.float32) * inv_sum
  return out.astype(v.dtype), e, inv_sum


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Attention over heads-major q [B, H, Lq, d], k and v [B, H, Lk, d]; its backward pass is
  flash attention's (`_attend_bwd`)."""
  return _attention_parts(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
  out, e, inv_sum = _attention_parts(q, k, v, mask)
  return out, (q, k, v, mask, out, e, inv_sum)


def _attend_bwd(residuals, g):
  """With P = e / l the probabilities and D = rowsum(dO * O): dV = P^T dO, and the logits'
  gradient P * (dO V^T - D) / sqrt(d), each computed from dO / l so that the [B, H, Lq, Lk]
  arrays take one element-wise pass (autodiff of the softmax takes several)."""
  q, k, v, mask, out, e, inv_sum = residuals
  g = g.astype(jnp.float32) * inv_sum
  rows = jnp.sum(g * out.astype(jnp.float32), axis=-1, keepdims=True)
  g = g.astype(v.dtype)
  dv = jnp.einsum("bhqk,bhqd->bhkd", e, g, preferred_element_type=jnp.float32)
  dp = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=jnp.float32)
  ds = e * (dp - rows) * (q.shape[-1] ** -0.5)
  if mask is not None:  # a row with every key masked attends uniformly; its logits are constants
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _pad_length(x: jax.Array, axis: int, pad: int, value=0) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
  """`dot_product_attention` through cuDNN's fused attention (`jax.nn.dot_product_attention`,
  implementation 'cudnn'): the [B, H, Lq, Lk] logits are never written to memory.

  cuDNN's training kernels take even sequence lengths only (jax 0.11 refuses the ViT's 197
  tokens), so an odd length is padded by one: an extra key that no query attends to (a key
  length when there is no mask, a False mask column otherwise) and an extra query row that is
  dropped. A mask becomes an additive bias over [B, 1 or H, Lq, Lk].
  """
  lq, lk = q.shape[1], k.shape[1]
  pad_q, pad_k = lq % 2, lk % 2
  q = _pad_length(q, 1, pad_q)
  k, v = _pad_length(k, 1, pad_k), _pad_length(v, 1, pad_k)
  kv_lengths = None
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
    mask = _pad_length(_pad_length(mask, 2, pad_q, True), 3, pad_k, False)
  elif pad_k:
    kv_lengths = jnp.full((q.shape[0],), lk, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths,
                                     implementation="cudnn")
  return out[:, :lq]


class Attention(nnx.Module):
  """Multi-head attention: queries from `x`, keys and values from `kv` (default `x`).

  `kv_width` is the feature size of `kv` when it differs from `width` (cross-attention);
  `implementation`: 'auto', 'xla' or 'cudnn' (`resolve_attention`).
  """

  def __init__(self, width: int, heads: int, *, kv_width: int | None = None,
               dtype=jnp.float32, implementation: str = "auto", rngs: nnx.Rngs):
    self.implementation = resolve_attention(implementation, dtype)
    if width % heads:
      raise ValueError(f"attention width {width} is not divisible by {heads} heads")
    head_dim = width // heads

    def heads_in(features):
      return nnx.LinearGeneral(features, (heads, head_dim), dtype=dtype, rngs=rngs,
                               dot_general=dense.dot_general,
                               kernel_init=param(DENSE_INIT, ("embed", "heads", "kv")),
                               bias_init=param(ZEROS, ("heads", "kv")))

    self.query = heads_in(width)
    self.key = heads_in(kv_width or width)
    self.value = heads_in(kv_width or width)
    self.out = nnx.LinearGeneral((heads, head_dim), width, axis=(-2, -1), dtype=dtype,
                                 rngs=rngs, dot_general=dense.dot_general,
                                 kernel_init=param(DENSE_INIT, ("heads", "kv", "embed")),
                                 bias_init=param(ZEROS, ("embed",)))

  def __call__(self, x: jax.Array, kv: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """x [B, Lq, D], kv [B, Lk, Dkv], boolean mask [B, 1 or H, Lq, Lk] (True = attend)."""
    return self.attend(x, *self.keys_values(x if kv is None else kv), mask)

  def keys_values(self, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, Lk, H, head_dim] of the tokens `kv` [B, Lk, Dkv]."""
    return (sharding.constrain(self.key(kv), HEADS), sharding.constrain(self.value(kv), HEADS))

  def attend(self, x: jax.Array, k: jax.Array, v: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
    """Queries from `x` [B, Lq, D] attend to keys and values from `keys_values`."""
    q = sharding.constrain(self.query(x), HEADS)
    return self.out(dot_product_attention(q, k, v, mask, self.implementation))


class KVCache(NamedTuple):
  """A block's self-attention keys and values [B, L, H, head_dim] over a decoding buffer and
  its cross-attention keys and values [B, Lk, H, head_dim] (None without cross-attention).
  A scanned `Encoder` stacks them along a leading layers axis."""
  keys: jax.Array
  values: jax.Array
  cross_keys: jax.Array | None = None
  cross_values: jax.Array | None = None


class Block(nnx.Module):
  """Pre-LayerNorm transformer block with an optional cross-attention sublayer.

  x + attn(ln(x)); with `cross_width` (the feature size of the attended tokens) then
  x + cross_attn(ln(x), kv) whenever `kv` is given (skipped otherwise); then x + mlp(ln(x)).
  """

  def __init__(self, width: int, heads: int, mlp_dim: int, *, cross_width: int | None = None,
               dtype=jnp.float32, attention: str = "auto", rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, dtype, rngs)
    self.attn = Attention(width, heads, dtype=dtype, implementation=attention, rngs=rngs)
    if cross_width:
      self.norm_cross = layer_norm(width, dtype, rngs)
      self.cross_attn = Attention(width, heads, kv_width=cross_width, dtype=dtype,
                                  implementation=attention, rngs=rngs)
    else:
      self.cross_attn = None
    self.norm2 = layer_norm(width, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, kv: jax.Array | None = None,
               kv_mask: jax.Array | None = None) -> jax.Array:
    return self.prefill(x, mask, kv, kv_mask)[0]

  def prefill(self, x: jax.Array, mask: jax.Array | None = None, kv: jax.Array | None = None,
              kv_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """The block's output and its keys and values, for `extend` to continue from.

    Keys and values are computed by the forward pass anyway: training drops them unused.
    """
    h = self.norm1(x)
    keys, values = self.attn.keys_values(h)
    x = x + self.attn.attend(h, keys, values, mask)
    cross = (None, None)
    if kv is not None and self.cross_attn is not None:
      cross = self.cross_attn.keys_values(kv)
      x = x + self.cross_attn.attend(self.norm_cross(x), *cross, kv_mask)
    x = x + self.mlp(self.norm2(x))
    return sharding.constrain(x, RESIDUAL), KVCache(keys, values, *cross)

  def extend(self, x: jax.Array, cache: KVCache, write: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, KVCache]:
    """One new token per row: x [B, 1, D] at the positions `write` [B, L] (one-hot) of the
    cache's self-attention keys and values, attending to the keys `mask` [B, 1, 1, L] allows
    (the new position included) and to all of the cached cross-attention keys."""
    h = self.norm1(x)
    k1, v1 = self.attn.keys_values(h)
    at = write[:, :, None, None]
    cache = cache._replace(keys=jnp.where(at, k1, cache.keys),
                           values=jnp.where(at, v1, cache.values))
    x = x + self.attn.attend(h, cache.keys, cache.values, mask)
    if cache.cross_keys is not None:
      x = x + self.cross_attn.attend(self.norm_cross(x), cache.cross_keys, cache.cross_values)
    x = x + self.mlp(self.norm2(x))
    return x, cache


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
               remat_policy: str = "none", dtype=jnp.float32, attention: str = "auto",
               rngs: nnx.Rngs):
    check_remat_policy(remat_policy)
    self.scan = scan
    self.remat_policy = remat_policy
    self.cross = bool(cross_width)
    if depth < 1:
      raise ValueError(f"an Encoder needs depth >= 1, got {depth}")
    make_unit = functools.partial(Block, width, heads, mlp_dim, cross_width=cross_width,
                                  dtype=dtype, attention=attention)
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

  def prefill(self, x: jax.Array, mask: jax.Array | None = None, kv: jax.Array | None = None,
              kv_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | list[KVCache]]:
    """`__call__` (without remat) that also returns each block's `KVCache`: stacked along a
    leading layers axis when scanned, else a list."""
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None), out_axes=(nnx.Carry, 0),
                transform_metadata=LAYERS)
      def scan_blocks(x, unit, mask, kv, kv_mask):
        return unit.prefill(x, mask, kv, kv_mask)

      return scan_blocks(x, self.blocks, mask, kv, kv_mask)
    caches = []
    for unit in self.blocks:
      x, cache = unit.prefill(x, mask, kv, kv_mask)
      caches.append(cache)
    return x, caches

  def extend(self, x: jax.Array, caches: KVCache | list[KVCache], write: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, KVCache | list[KVCache]]:
    """`Block.extend` through every block: x [B, 1, D] -> ([B, 1, D], updated caches)."""
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None), out_axes=(nnx.Carry, 0),
                transform_metadata=LAYERS)
      def scan_blocks(x, unit, cache, write, mask):
        return unit.extend(x, cache, write, mask)

      return scan_blocks(x, self.blocks, caches, write, mask)
    out = []
    for unit, cache in zip(self.blocks, caches):
      x, cache = unit.extend(x, cache, write, mask)
      out.append(cache)
    return x, out
