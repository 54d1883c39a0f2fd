"""Optimizer: AdamW with warmup-cosine schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def schedule(config) -> optax.Schedule:
  o = config.optim
  warmup = min(o.warmup_steps, max(config.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=o.lr * o.end_lr_fraction)


def decay_mask(params) -> object:
  """Weight decay on matrices only: no decay on biases, norms, embeddings of rank 1, scalars."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make(config) -> optax.GradientTransformation:
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask),
  )


def optimizer(model: nnx.Module, config) -> nnx.Optimizer:
  return nnx.Optimizer(model, make(config), wrt=nnx.Param)
