"""The three objectives: contrast (ITC), match (ITM) and reconstruct, as pure array functions.

Every objective takes per-pair weights (from SCIO's pair table; 1 by default, 0 for an invalid
example) and returns (scalar loss, metrics). Objectives see the global batch: inputs are sharded
over the batch axes and XLA inserts the collectives the similarity matrix needs, so no
hand-written all-gather appears here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klip.data import caption as caption_lib

_NEG = -1e9


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def _pair_mask(weights: jax.Array) -> jax.Array:
  ok = weights > 0
  return ok[:, None] & ok[None, :]


def _soft_cross_entropy(targets: jax.Array, logits: jax.Array, col_ok: jax.Array) -> jax.Array:
  """Per-row -sum(targets * log_softmax(logits)) over the admissible columns `col_ok` only.

  Masked columns hold logits of -1e9: target mass there would cost about 1e9 per row, so it
  is left out (the targets of `distillation_targets` put none there anyway).
  """
  logp = jax.nn.log_softmax(logits, axis=1)
  return -jnp.sum(jnp.where(col_ok, targets * logp, 0.0), axis=1)


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
  col_ok = (weights > 0)[None]
  i2t = _soft_cross_entropy(i2t_target, logits, col_ok)
  t2i = _soft_cross_entropy(t2i_target, logits.T, col_ok)
  loss = _weighted_mean(jnp.where(weights > 0, 0.5 * (i2t + t2i), 0.0), weights)
  correct = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32)
  return loss, {"contrast/loss": loss,
                "contrast/i2t_accuracy": _weighted_mean(correct, (weights > 0) * 1.0),
                "contrast/temperature": 1.0 / scale}


def clause_contrastive(zimg, zclause, scale, weights, clause_tokens):
  """Softmax InfoNCE of each image against one clause of its caption alone (e.g. "the targets
  are classified as ship"), beside the whole-caption contrast.

  Short clauses repeat across a batch (many images have "the number of targets is 1"): every
  image whose drawn clause is the same text is a positive, with the target mass shared equally
  among them, rather than a negative the model is pushed away from.
  zclause: [B, E] unit clause embeddings; clause_tokens: [B, L] their tokens.
  """
  fp = text_fingerprint(clause_tokens)
  same = ((fp[:, None] == fp[None, :]) & _pair_mask(weights)).astype(jnp.float32)
  targets = same / jnp.maximum(jnp.sum(same, axis=1, keepdims=True), 1.0)
  loss, m = contrastive(zimg, zclause, scale, weights, soft_targets=(targets, targets))
  return loss, {"clause_contrast/loss": loss,
                "clause_contrast/i2t_accuracy": m["contrast/i2t_accuracy"]}


def clause_rivals(zimg, zclause, zrivals, scale, weights, has_rival):
  """Softmax cross-entropy of each image's clause against the same clause with other values
  of its field (`klip/data/negatives.py` rivals): the image must score "the targets are
  classified as ship" above "... as vehicle", the choice a zero-shot classifier makes.

  zclause: [B, E] unit clause embeddings; zrivals: [B, R, E] its rivals'; has_rival: [B, R]
  (0: padding, left out). A row without rivals adds no loss (one admissible column).
  """
  own = jnp.sum(zimg * zclause, axis=-1, keepdims=True)
  rivals = jnp.einsum("be,bre->br", zimg, zrivals, preferred_element_type=jnp.float32)
  logits = scale * jnp.concatenate([own, rivals], axis=1)
  ok = jnp.concatenate([jnp.ones_like(own, bool), has_rival > 0], axis=1)
  logits = jnp.where(ok, logits, _NEG)
  nll = -jax.nn.log_softmax(logits, axis=1)[:, 0]
  active = (weights > 0) & jnp.any(has_rival > 0, axis=1)
  loss = _weighted_mean(jnp.where(active, nll, 0.0), jnp.where(active, weights, 0.0))
  correct = (jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)
  return loss, {"clause_rivals/loss": loss,
                "clause_rivals/accuracy": _weighted_mean(correct, active * 1.0)}


def sigmoid_contrastive(zimg, ztxt, scale, bias, weights):
  """SigLIP: every pair is an independent binary match, no softmax over the batch."""
  logits = scale * jnp.einsum("ie,te->it", zimg, ztxt, preferred_element_type=jnp.float32) + bias
  labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  pair_w = jnp.sqrt(weights[:, None] * weights[None, :]) * _pair_mask(weights)
  per_pair = -jax.nn.log_sigmoid(labels * logits)
  loss = jnp.sum(per_pair * pair_w) / jnp.maximum(jnp.sum(weights > 0), 1)
  return loss, {"contrast/loss": loss, "contrast/temperature": 1.0 / scale,
                "contrast/bias": bias}


def distillation_targets(sim_i2t_m, sim_t2i_m, alpha: float, weights=None):
  """Momentum-distillation targets: alpha * softmax(momentum logits) + (1 - alpha) * 1-hot.

  sim_*_m: [B, B + Q] logits of the momentum encoders (scale * cosine; batch first, then the
  queue). weights: optional [B] per-pair weights: the batch columns of weight 0, which
  `queue_contrastive` masks out, get no target mass (the queue's columns are all kept).
  The targets are constants of the step, as in ALBEF (computed without gradient): nothing,
  the temperature included, is trained through its own targets.
  """
  b, n = sim_i2t_m.shape
  eye = jnp.eye(b, n, dtype=jnp.float32)
  if weights is not None:
    col_ok = jnp.concatenate([weights > 0, jnp.ones(n - b, bool)])[None]
    sim_i2t_m = jnp.where(col_ok, sim_i2t_m, _NEG)
    sim_t2i_m = jnp.where(col_ok, sim_t2i_m, _NEG)
  targets = (alpha * jax.nn.softmax(sim_i2t_m.astype(jnp.float32), axis=1) + (1 - alpha) * eye,
             alpha * jax.nn.softmax(sim_t2i_m.astype(jnp.float32), axis=1) + (1 - alpha) * eye)
  return jax.lax.stop_gradient(targets)


def queue_contrastive(zimg, ztxt, img_queue, txt_queue, scale, weights, targets):
  """ITC against the batch plus a feature queue (ALBEF/BLIP), with soft targets [B, B + Q].

  An example of weight 0 is left out as anchor and as a batch column; target mass on such a
  column is ignored, so `targets` should come from `distillation_targets` with the weights.
  """
  ok = weights > 0
  bank_t = jnp.concatenate([ztxt, txt_queue], axis=0)
  bank_i = jnp.concatenate([zimg, img_queue], axis=0)
  col_ok = jnp.concatenate([ok, jnp.ones(txt_queue.shape[0], bool)])
  i2t = scale * zimg @ bank_t.T
  t2i = scale * ztxt @ bank_i.T
  i2t = jnp.where(col_ok[None], i2t, _NEG)
  t2i = jnp.where(col_ok[None], t2i, _NEG)
  i2t_target, t2i_target = targets
  li = _soft_cross_entropy(i2t_target, i2t, col_ok[None])
  lt = _soft_cross_entropy(t2i_target, t2i, col_ok[None])
  loss = _weighted_mean(jnp.where(ok, 0.5 * (li + lt), 0.0), weights)
  correct = (jnp.argmax(i2t, axis=1) == jnp.arange(i2t.shape[0])).astype(jnp.float32)
  return loss, {"contrast/loss": loss, "contrast/temperature": 1.0 / scale,
                "contrast/i2t_accuracy": _weighted_mean(correct, ok * 1.0)}


def text_fingerprint(tokens: jax.Array) -> jax.Array:
  """A per-row hash of the tokens: equal captions get equal values (to exclude duplicates)."""
  proj = jnp.sin(jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.float32) * 12.9898) * 43758.5453
  return jnp.sum(tokens.astype(jnp.float32) * jnp.mod(proj, 1.0), axis=1)


def hard_negatives(rng, logits: jax.Array, weights: jax.Array, tokens: jax.Array):
  """One negative text per image and one negative image per text, drawn in proportion to
  softmax(logits) over the batch, never the positive (nor a caption identical to it).

  logits: [B, B] image-text logits (rows: images), the contrastive temperature's scale times
  the cosines, as BLIP draws them (softmax(sim / temp)): softmax of raw cosines in [-1, 1] is
  close to uniform, and the match head would rarely see a hard negative. No gradient flows
  through them. Returns (neg_text [B], neg_image [B], has_neg [B] bool): has_neg is False
  where no admissible negative exists.
  """
  fp = text_fingerprint(tokens)
  same_text = fp[:, None] == fp[None, :]
  allowed = _pair_mask(weights) & ~same_text  # excludes the diagonal too
  logits = jax.lax.stop_gradient(logits)
  k_text, k_image = jax.random.split(rng)
  neg_text = jax.random.categorical(k_text, jnp.where(allowed, logits, -jnp.inf), axis=1)
  neg_image = jax.random.categorical(k_image, jnp.where(allowed, logits, -jnp.inf).T, axis=1)
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
  """Corrupts value-span tokens: a share mask_p -> [MASK], random_p -> a random piece, the
  rest kept (the method's 0.5 / 0.1; 0 / 0 leaves the caption clean).

  Returns the decoder input: [DEC] in place of [ENC], value tokens corrupted.
  """
  is_value = clause >= 0
  k_u, k_r = jax.random.split(rng)
  u = jax.random.uniform(k_u, tokens.shape)
  random_ids = jax.random.randint(k_r, tokens.shape, caption_lib.SEP + 1, vocab_size)
  out = jnp.where(is_value & (u < mask_p), caption_lib.MASK, tokens)
  out = jnp.where(is_value & (u >= mask_p) & (u < mask_p + random_p), random_ids, out)
  return out.at[:, 0].set(caption_lib.DEC)


def reconstruction(logits, tokens, clause, weights, smoothing: float = 0.1):
  """Shifted next-token loss, counted where the target is a value-span token or the end of one.

  logits: [B, L, V] decoder outputs at positions 0..L-1 predicting tokens 1..L. The token
  after a value span is its end, target [SEP] (the separator itself, or for the caption's last
  clause the PAD after it): generation writes a value up to [SEP] (`predict.caption`,
  `predict.fill_span`), so the decoder has to learn where a value stops, not only what it says.
  """
  in_value = clause[:, 1:] >= 0
  ends = (clause[:, :-1] >= 0) & ~in_value
  targets = jnp.where(ends, caption_lib.SEP, tokens[:, 1:])
  counted = (in_value | ends) & (weights[:, None] > 0)
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
