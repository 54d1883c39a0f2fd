"""Training objectives. Each objective returns (scalar loss, metrics); `total` weighs them.

Objectives see the global batch: inputs are sharded over the batch axes and XLA inserts the
collectives that the similarity matrix needs, so no hand-written all-gather appears here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e9


def contrastive(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, valid: jax.Array):
  """Symmetric softmax InfoNCE over the global batch; invalid examples are left out.

  zimg, ztxt: [B, E] L2-normalised; scale: temperature scale (1/tau); valid: [B] 0/1.
  """
  valid = valid.astype(bool)
  logits = scale * jnp.einsum("ie,te->it", zimg, ztxt, preferred_element_type=jnp.float32)
  pair_ok = valid[:, None] & valid[None, :]
  logits = jnp.where(pair_ok, logits, _NEG)
  n = jnp.maximum(valid.sum(), 1)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  loss = jnp.sum(jnp.where(valid, 0.5 * (i2t + t2i), 0.0)) / n
  correct = jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])
  accuracy = jnp.sum(jnp.where(valid, correct, False)) / n
  return loss, {"contrast/loss": loss, "contrast/i2t_accuracy": accuracy,
                "contrast/temperature": 1.0 / scale}


def total(model, batch, rng, config):
  """The weighted sum of the configured objectives for one (micro)batch.

  `rng` (folded with the step) is for objectives that sample; contrast needs none.
  """
  del rng
  zimg, ztxt, scale = model(batch["image"], batch["tokens"])
  loss, metrics = contrastive(zimg, ztxt, scale, batch["valid"])
  weighted = config.loss.contrast_weight * loss
  metrics["loss"] = weighted
  return weighted, metrics
