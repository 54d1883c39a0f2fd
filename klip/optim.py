"""Optimizer: AdamW with warmup-cosine schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def schedule_steps(config) -> int:
  """The steps the schedule spans: `schedule_steps`, else (0) `total_steps`."""
  return config.schedule_steps or config.total_steps


def schedule(config) -> optax.Schedule:
  """Warm-up, then cosine decay to `end_lr_fraction` of the peak; held there after the
  schedule's last step (a run extended past it)."""
  o = config.optim
  steps = schedule_steps(config)
  warmup = min(o.warmup_steps, max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=o.lr * o.end_lr_fraction)


# Decayed: the dense kernels and the token embedding (also the tied output layer). Everything
# else is not: biases, LayerNorm scales, the temperature (`logit_scale`), `logit_bias`, the
# match logit's cosine scale (`itm_log_scale`), the class token and position embeddings (left
# out as in timm's ViT and DeiT recipes).
DECAYED = ("kernel", "embedding")


def _param_name(path) -> str:
  """A parameter's own name: the last string key of its path (an `nnx.State` of Variables
  adds a `.value` attribute key after it; looped layers add an integer key before it)."""
  names = [k.key for k in path
           if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
  return names[-1] if names else ""


def decay_mask(params) -> object:
  """True where a parameter gets weight decay: the leaves named in DECAYED.

  Decided by name, not rank: scanned layers (`model.scan_layers`) stack every block parameter
  along a leading layers axis, so a block's biases and LayerNorm scales have rank 2 there, and
  the attention's query/key/value biases [heads, head_dim] have rank 2 even unscanned.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) in DECAYED,
                                          params)


def make(config) -> optax.GradientTransformation:
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask),
  )


def optimizer(model: nnx.Module, config) -> nnx.Optimizer:
  return nnx.Optimizer(model, make(config), wrt=nnx.Param)
