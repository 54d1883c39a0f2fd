"""The weighted sum of the three objectives for one (micro)batch: what the train step minimises.

Contrast (ITC): softmax InfoNCE (default), SigLIP-style sigmoid, or softmax against a momentum
feature queue with momentum distillation (`loss.momentum.enabled`). Match (ITM): fused positives
plus one hard negative text per image and one hard negative image per text, all three kinds of
pair scored in one batched pass of the fusion blocks (with `loss.clause_negatives`, also each
image with its own caption, one observable value swapped, ranked below the caption).
Clause contrast: each image against one of its clauses alone (in-batch), and with
`loss.clause_rivals` that clause against itself with other values of its field.
Reconstruct: the image-conditioned decoder predicts the value-span tokens from the caption, its
input value tokens corrupted at `loss.reconstruct_mask_p` / `reconstruct_random_p` (0: clean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klip import losses
from klip import predict
from klip.model import two_tower


def momentum_targets(momentum_model, batch, queues, scale, alpha: float):
  """Momentum features of the batch and the distillation targets against batch + queue.

  The targets carry no gradient (ALBEF computes them without): the temperature `scale` is
  not trained through its own targets. The batch's examples of weight 0 get no target mass.
  """
  zimg_m, _ = predict.embed_images(momentum_model, batch["image"])
  ztxt_m = predict.embed_texts(momentum_model, batch["tokens"])
  zimg_m, ztxt_m, scale = jax.lax.stop_gradient((zimg_m, ztxt_m, scale))
  img_queue, txt_queue = queues
  sim_i2t = scale * zimg_m @ jnp.concatenate([ztxt_m, txt_queue]).T
  sim_t2i = scale * ztxt_m @ jnp.concatenate([zimg_m, img_queue]).T
  targets = losses.distillation_targets(sim_i2t, sim_t2i, alpha, batch["weight"])
  return (zimg_m, ztxt_m), targets


def clause_tokens_len(config) -> int:
  """The length of the batch's `clause_tokens` (0: the clause contrast is off, none made)."""
  return config.loss.clause_max_len if config.loss.clause_contrast_weight else 0


def clause_rival_count(config) -> int:
  """Rivals per example in the batch's `rival_tokens` (0: none made). Raises ValueError for a
  negative count or rivals without the clause contrast they belong to."""
  rivals = int(config.loss.clause_rivals)
  if rivals < 0 or (rivals and not clause_tokens_len(config)):
    raise ValueError(f"loss.clause_rivals={rivals} needs to be >= 0, and > 0 only with the "
                     "clause contrast on (loss.clause_contrast_weight > 0, clause_max_len > 0)")
  return rivals


def swaps(config) -> bool:
  """Whether the batch carries clause-swap negatives (`swap_tokens`, `has_swap`)."""
  return bool(config.loss.clause_negatives and config.loss.match_weight > 0)


def total(model, batch, rng, config, momentum=None):
  """Returns (weighted total loss, (metrics, momentum features)).

  momentum: None, or (momentum model, (image queue, text queue)) when loss.momentum.enabled;
  the momentum model's (image, text) features of the batch are then returned for the enqueue
  (None without momentum).
  """
  cfg = config.loss
  weights = batch["weight"]
  tokens, clause = batch["tokens"], batch["clause"]
  k_neg, k_corrupt = jax.random.split(rng)
  zimg, image_tokens = predict.embed_images(model, batch["image"])
  states = model.text_states(tokens)  # the text-only blocks run once per text
  ztxt = model.embed_text_states(states)
  scale = model.temperature_scale()
  metrics, features_m = {}, None

  # ----- contrast -----
  if momentum is not None:
    momentum_model, queues = momentum
    features_m, targets = momentum_targets(momentum_model, batch, queues, scale,
                                           cfg.momentum.alpha)
    contrast, m = losses.queue_contrastive(zimg, ztxt, *queues, scale, weights, targets)
  elif cfg.contrast_type == "sigmoid":
    contrast, m = losses.sigmoid_contrastive(zimg, ztxt, scale, model.logit_bias[...], weights)
  else:
    contrast, m = losses.contrastive(zimg, ztxt, scale, weights)
  metrics.update(m)
  total_loss = cfg.contrast_weight * contrast
  if cfg.clause_contrast_weight:  # each image against one of its clauses alone
    zclause = predict.embed_texts(model, batch["clause_tokens"])
    clause_loss, m = losses.clause_contrastive(zimg, zclause, scale, weights,
                                               batch["clause_tokens"])
    metrics.update(m)
    total_loss += cfg.clause_contrast_weight * clause_loss
    if clause_rival_count(config):  # ... and that clause above itself with other values
      rivals = batch["rival_tokens"]
      b, r, length = rivals.shape
      zrivals = predict.embed_texts(model, rivals.reshape(b * r, length)).reshape(b, r, -1)
      rival_loss, m = losses.clause_rivals(zimg, zclause, zrivals, scale, weights,
                                           batch["has_rival"])
      metrics.update(m)
      total_loss += cfg.clause_contrast_weight * rival_loss

  # ----- match -----
  if cfg.match_weight:
    # drawn from softmax(cosine / temperature), BLIP's hard negatives
    neg_logits = jax.lax.stop_gradient(scale) * (zimg @ ztxt.T)
    neg_text, neg_image, has_neg = losses.hard_negatives(k_neg, neg_logits, weights, tokens)
    b = tokens.shape[0]
    rows = jnp.arange(b)
    images = [image_tokens, image_tokens, image_tokens[neg_image]]
    texts = states.take(jnp.concatenate([rows, neg_text, rows]))
    # the pairs' embeddings, for model.match_cosine (the batch's are at hand)
    zimgs, ztxts = [zimg, zimg, zimg[neg_image]], [ztxt, ztxt[neg_text], ztxt]
    if swaps(config):  # each image with its caption, one observable value swapped
      swap = model.text_states(batch["swap_tokens"])
      images.append(image_tokens)
      texts = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), texts, swap)
      zimgs.append(zimg)
      ztxts.append(model.embed_text_states(swap) if model.match_cosine else ztxt)
    cosine = (jnp.sum(jnp.concatenate(zimgs) * jnp.concatenate(ztxts), axis=-1)
              if model.match_cosine else None)
    logits = model.match_logits_states(jnp.concatenate(images), texts, cosine)
    swap_logits, has_swap = ((logits[3 * b:], batch["has_swap"]) if swaps(config)
                             else (None, None))
    match, m = losses.matching(logits[:b], logits[b:2 * b], logits[2 * b:3 * b], weights,
                               has_neg, two_tower.POSITIVE, swap_logits, has_swap)
    metrics.update(m)
    total_loss += cfg.match_weight * match

  # ----- reconstruct -----
  if cfg.reconstruct_weight:
    decoder_input = losses.corrupt_values(k_corrupt, tokens, clause,
                                          config.model.text.vocab_size,
                                          cfg.reconstruct_mask_p, cfg.reconstruct_random_p)
    logits = model.decode_logits(image_tokens, decoder_input)
    recon, m = losses.reconstruction(logits, tokens, clause, weights, cfg.label_smoothing)
    metrics.update(m)
    total_loss += cfg.reconstruct_weight * recon

  metrics["loss"] = total_loss
  return total_loss, (metrics, features_m)
