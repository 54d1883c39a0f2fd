"""The three objectives: contrast (ITC), match (ITM) and reconstruct, as pure array functions.

Every objective takes per-pair weights (from SCIO's pair table; 1 by default, 0 for an invalid
example) and returns (scalar loss, metrics). Objectives see the global batch: inputs are sharded
over the batch axes and XLA inserts the collectives the similarity matrix needs, so no
hand-written all-gather appears here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klip.data import tokenizer as tok

_NEG = -1e9


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def _pair_mask(weights: jax.Array) -> jax.Array:
  ok = weights > 0
  return ok[:, None] & ok[None, :]


def contrastive(zimg, ztxt, scale, weights, soft_targets=None):
  """Symmetric softmax InfoNCE over the global batch.

  zimg, ztxt: [B, E] unit vectors; scale: 1/temperature; weights: [B] per-pair weights (0 leaves
  an example out as anchor and as negative). soft_targets: optional (i2t [B, B], t2i [B, B])
  distributions (momentum distillation) replacing the one-hot targets.
  """
  logits = scale * jnp.einsum("ie,te->it", zimg, ztxt, preferred_element_type=jnp.float32)
  logits = jnp.where(_pair_mask(weights), logits, _NEG)
  eye = jnp.eye(logits.shape[0], dtype=jnp.float32)
  i2t_target, t2i_target = soft_targets if soft_targets is not None else (eye, eye)
  i2t = -jnp.sum(i2t_target * jax.nn.log_softmax(logits, axis=1), axis=1)
  t2i = -jnp.sum(t2i_target * jax.nn.log_softmax(logits, axis=0).T, axis=1)
  loss = _weighted_mean(0.5 * (i2t + t2i), weights)
  correct = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32)
  return loss, {"contrast/loss": loss,
                "contrast/i2t_accuracy": _weighted_mean(correct, (weights > 0) * 1.0),
                "contrast/temperature": 1.0 / scale}


def sigmoid_contrastive(zimg, ztxt, scale, bias, weights):
  """SigLIP: every pair is an independent binary match, no softmax over the batch."""
  logits = scale * jnp.einsum("ie,te->it", zimg, ztxt, preferred_element_type=jnp.float32) + bias
  labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  pair_w = jnp.sqrt(weights[:, None] * weights[None, :]) * _pair_mask(weights)
  per_pair = -jax.nn.log_sigmoid(labels * logits)
  loss = jnp.sum(per_pair * pair_w) / jnp.maximum(jnp.sum(weights > 0), 1)
  return loss, {"contrast/loss": loss, "contrast/temperature": 1.0 / scale,
                "contrast/bias": bias}


def distillation_targets(sim_i2t_m, sim_t2i_m, alpha: float):
  """Momentum-distillation targets: alpha * softmax(momentum similarities) + (1 - alpha) * 1-hot.

  sim_*_m: [B, B + Q] similarities of the momentum encoders (batch first, then the queue).
  """
  eye = jnp.eye(sim_i2t_m.shape[0], sim_i2t_m.shape[1], dtype=jnp.float32)
  return (alpha * jax.nn.softmax(sim_i2t_m, axis=1) + (1 - alpha) * eye,
          alpha * jax.nn.softmax(sim_t2i_m, axis=1) + (1 - alpha) * eye)


def queue_contrastive(zimg, ztxt, img_queue, txt_queue, scale, weights, targets):
  """ITC against the batch plus a feature queue (ALBEF/BLIP), with soft targets [B, B + Q]."""
  ok = weights > 0
  bank_t = jnp.concatenate([ztxt, txt_queue], axis=0)
  bank_i = jnp.concatenate([zimg, img_queue], axis=0)
  col_ok = jnp.concatenate([ok, jnp.ones(txt_queue.shape[0], bool)])
  i2t = scale * zimg @ bank_t.T
  t2i = scale * ztxt @ bank_i.T
  i2t = jnp.where(col_ok[None], i2t, _NEG)
  t2i = jnp.where(col_ok[None], t2i, _NEG)
  i2t_target, t2i_target = targets
  li = -jnp.sum(i2t_target * jax.nn.log_softmax(i2t, axis=1), axis=1)
  lt = -jnp.sum(t2i_target * jax.nn.log_softmax(t2i, axis=1), axis=1)
  loss = _weighted_mean(0.5 * (li + lt), weights)
  correct = (jnp.argmax(i2t, axis=1) == jnp.arange(i2t.shape[0])).astype(jnp.float32)
  return loss, {"contrast/loss": loss, "contrast/temperature": 1.0 / scale,
                "contrast/i2t_accuracy": _weighted_mean(correct, ok * 1.0)}


def text_fingerprint(tokens: jax.Array) -> jax.Array:
  """A per-row hash of the tokens: equal captions get equal values (to exclude duplicates)."""
  proj = jnp.sin(jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.float32) * 12.9898) * 43758.5453
  return jnp.sum(tokens.astype(jnp.float32) * jnp.mod(proj, 1.0), axis=1)


def hard_negatives(rng, sim: jax.Array, weights: jax.Array, tokens: jax.Array):
  """One negative text per image and one negative image per text, drawn in proportion to
  softmax(similarity) over the batch, never the positive (nor a caption identical to it).

  sim: [B, B] image-text similarities (rows: images). Returns (neg_text [B], neg_image [B],
  has_neg [B] bool): has_neg is False where no admissible negative exists.
  """
  fp = text_fingerprint(tokens)
  same_text = fp[:, None] == fp[None, :]
  allowed = _pair_mask(weights) & ~same_text  # excludes the diagonal too
  sim = jax.lax.stop_gradient(sim)
  k_text, k_image = jax.random.split(rng)
  neg_text = jax.random.categorical(k_text, jnp.where(allowed, sim, -jnp.inf), axis=1)
  neg_image = jax.random.categorical(k_image, jnp.where(allowed, sim, -jnp.inf).T, axis=1)
  has_neg = jnp.any(allowed, axis=1)
  return neg_text, neg_image, has_neg


def matching(pos_logits, neg_text_logits, neg_image_logits, weights, has_neg, positive: int,
             swap_logits=None, has_swap=None):
  """ITM cross-entropy over positives and the two kinds of hard negatives ([B, 2] logits each),
  plus, with clause-swap negatives (`swap_logits` where `has_swap`), a ranking term per pair:
  -log sigmoid(match log-odds of the caption - those of its swap). Ranked against its own
  positive rather than classified, the near-duplicate swap does not pull every positive
  towards "no match" (classified, it drove the tiny run's positive accuracy to 0.16).

  `positive` is the index of "match" in the 2-way head (two_tower.POSITIVE).
  """
  negative = 1 - positive
  lp = -jax.nn.log_softmax(pos_logits)[:, positive]
  lt = -jax.nn.log_softmax(neg_text_logits)[:, negative]
  li = -jax.nn.log_softmax(neg_image_logits)[:, negative]
  w_neg = weights * has_neg
  total = jnp.sum(lp * weights) + jnp.sum((lt + li) * w_neg)
  count = jnp.sum(weights) + 2 * jnp.sum(w_neg)
  metrics = {}
  if swap_logits is not None:
    w_swap = weights * has_swap
    odds = lambda z: z[:, positive] - z[:, negative]
    rise = odds(pos_logits) - odds(swap_logits)
    total, count = total + jnp.sum(jax.nn.softplus(-rise) * w_swap), count + jnp.sum(w_swap)
    acc_swap = rise > 0
    metrics["match/swap_accuracy"] = _weighted_mean(acc_swap * 1.0, (w_swap > 0) * 1.0)
  loss = total / jnp.maximum(count, 1e-6)
  acc_pos = jnp.argmax(pos_logits, axis=1) == positive
  acc_neg = (jnp.argmax(neg_text_logits, axis=1) == negative) & (
      jnp.argmax(neg_image_logits, axis=1) == negative)
  return loss, {"match/loss": loss,
                "match/pos_accuracy": _weighted_mean(acc_pos * 1.0, (weights > 0) * 1.0),
                "match/neg_accuracy": _weighted_mean(acc_neg * 1.0, (w_neg > 0) * 1.0),
                **metrics}


def corrupt_values(rng, tokens, clause, vocab_size: int, mask_p=0.5, random_p=0.1):
  """Corrupts every value-span token: 50 % -> [MASK], 10 % -> a random piece, 40 % kept.

  Returns the decoder input: [DEC] in place of [ENC], value tokens corrupted.
  """
  is_value = clause >= 0
  k_u, k_r = jax.random.split(rng)
  u = jax.random.uniform(k_u, tokens.shape)
  random_ids = jax.random.randint(k_r, tokens.shape, tok.SEP + 1, vocab_size)
  out = jnp.where(is_value & (u < mask_p), tok.MASK, tokens)
  out = jnp.where(is_value & (u >= mask_p) & (u < mask_p + random_p), random_ids, out)
  return out.at[:, 0].set(tok.DEC)


def reconstruction(logits, tokens, clause, weights, smoothing: float = 0.1):
  """Shifted next-token loss, counted only where the target is a value-span token.

  logits: [B, L, V] decoder outputs at positions 0..L-1 predicting tokens 1..L.
  """
  targets = tokens[:, 1:]
  counted = (clause[:, 1:] >= 0) & (weights[:, None] > 0)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  smooth = -jnp.mean(logp, axis=-1)
  per_token = (1 - smoothing) * nll + smoothing * smooth
  w = counted * weights[:, None]
  loss = jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), 1e-6)
  correct = (jnp.argmax(logp, axis=-1) == targets) & counted
  return loss, {"reconstruct/loss": loss,
                "reconstruct/token_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(counted),
                                                                             1)}
