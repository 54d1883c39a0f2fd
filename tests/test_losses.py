"""Each objective against a small reference computed in numpy, and what `klip.objectives` feeds
them (the hard-negative draw, the momentum-distillation targets)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from klip import losses
from klip import objectives
from klip import predict
from klip.data import caption as caption_lib
from klip.model.two_tower import Model


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


@pytest.fixture
def pair():
  rng = np.random.default_rng(0)
  return (_unit(rng.normal(size=(6, 4))).astype(np.float32),
          _unit(rng.normal(size=(6, 4))).astype(np.float32))


def test_contrastive_matches_numpy_with_weights(pair):
  zimg, ztxt = pair
  w = np.array([1, 1, 0.5, 1, 0, 1], np.float32)
  loss, _ = losses.contrastive(zimg, ztxt, 10.0, w)
  keep = w > 0
  logits = 10.0 * zimg[keep] @ ztxt[keep].T
  per = -0.5 * (np.diag(_log_softmax(logits, 1)) + np.diag(_log_softmax(logits, 0)))
  expected = np.sum(per * w[keep]) / w[keep].sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sigmoid_contrastive_matches_numpy(pair):
  zimg, ztxt = pair
  w = np.ones(6, np.float32)
  loss, _ = losses.sigmoid_contrastive(zimg, ztxt, 10.0, -3.0, w)
  logits = 10.0 * zimg @ ztxt.T - 3.0
  labels = 2 * np.eye(6) - 1
  expected = np.sum(np.log1p(np.exp(-labels * logits))) / 6
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_queue_contrastive_with_one_hot_targets_equals_plain_infonce_on_the_batch(pair):
  zimg, ztxt = pair
  w = np.ones(6, np.float32)
  far = np.zeros((3, 4), np.float32)  # queue entries that add exp(0) to every denominator
  targets = (np.eye(6, 9, dtype=np.float32),) * 2
  loss, _ = losses.queue_contrastive(zimg, ztxt, far, far, 10.0, w, targets)
  bank_t = np.concatenate([ztxt, far])
  bank_i = np.concatenate([zimg, far])
  li = -np.diag(_log_softmax(10 * zimg @ bank_t.T, 1))
  lt = -np.diag(_log_softmax(10 * ztxt @ bank_i.T, 1))
  np.testing.assert_allclose(loss, np.mean(0.5 * (li + lt)), rtol=1e-5)


def test_distillation_targets_are_distributions():
  sim = jax.random.normal(jax.random.key(0), (4, 7))
  a, b = losses.distillation_targets(sim, sim, 0.4)
  np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(a)[np.arange(4), np.arange(4)] >= 0.6)


def test_hard_negatives_never_the_positive_nor_a_duplicate_caption():
  """Property test over random similarity matrices."""
  for seed in range(50):
    rng = np.random.default_rng(seed)
    b = int(rng.integers(2, 12))
    sim = rng.normal(size=(b, b)).astype(np.float32) * 5
    sim[np.arange(b), np.arange(b)] += 20  # the positive is by far the most similar
    tokens = rng.integers(6, 50, size=(b, 9)).astype(np.int32)
    if b > 3:
      tokens[1] = tokens[0]  # two identical captions: neither may be the other's negative
    w = (rng.random(b) > 0.2).astype(np.float32)
    nt, ni, has = map(np.asarray, losses.hard_negatives(jax.random.key(seed), sim, w, tokens))
    for i in range(b):
      if not has[i]:
        continue
      assert nt[i] != i and ni[i] != i and w[nt[i]] > 0 and w[ni[i]] > 0
      assert not np.array_equal(tokens[nt[i]], tokens[i])
      assert not np.array_equal(tokens[ni[i]], tokens[i])


def test_hard_negatives_follow_similarity():
  sim = np.zeros((4, 4), np.float32)
  sim[0, 3] = 8.0  # image 0 is much closer to text 3 than to texts 1, 2
  tokens = np.arange(4 * 5).reshape(4, 5).astype(np.int32) + 6
  picks = [int(losses.hard_negatives(jax.random.key(k), sim, np.ones(4), tokens)[0][0])
           for k in range(200)]
  assert picks.count(3) > 180


def test_matching_loss_matches_numpy_and_uses_the_positive_index():
  rng = np.random.default_rng(1)
  pos, nt, ni = (rng.normal(size=(5, 2)).astype(np.float32) for _ in range(3))
  w = np.array([1, 1, 1, 0.5, 1], np.float32)
  has = np.array([1, 1, 0, 1, 1], bool)
  loss, _ = losses.matching(pos, nt, ni, w, has, positive=1)
  lp = -_log_softmax(pos, 1)[:, 1]
  lneg = -_log_softmax(nt, 1)[:, 0] - _log_softmax(ni, 1)[:, 0]
  wn = w * has
  expected = (np.sum(lp * w) + np.sum(lneg * wn)) / (w.sum() + 2 * wn.sum())
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_matching_loss_with_clause_swap_negatives_matches_numpy():
  rng = np.random.default_rng(3)
  pos, nt, ni, sw = (rng.normal(size=(5, 2)).astype(np.float32) for _ in range(4))
  w = np.array([1, 1, 1, 0.5, 0], np.float32)
  has = np.array([1, 1, 0, 1, 1], bool)
  has_swap = np.array([1, 0, 1, 1, 1], np.int32)
  loss, m = losses.matching(pos, nt, ni, w, has, positive=1, swap_logits=sw,
                            has_swap=has_swap)
  wn, ws = w * has, w * has_swap
  rise = (pos[:, 1] - pos[:, 0]) - (sw[:, 1] - sw[:, 0])  # match log-odds: caption - its swap
  expected = (np.sum(-_log_softmax(pos, 1)[:, 1] * w)
              + np.sum((-_log_softmax(nt, 1)[:, 0] - _log_softmax(ni, 1)[:, 0]) * wn)
              + np.sum(np.log1p(np.exp(-rise)) * ws)) / (w.sum() + 2 * wn.sum() + ws.sum())
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  counted = ws > 0
  np.testing.assert_allclose(m["match/swap_accuracy"], np.mean(rise[counted] > 0), rtol=1e-6)


def test_corruption_touches_only_value_tokens_in_the_right_proportions():
  n, length = 400, 50
  tokens = np.full((n, length), 100, np.int32)
  clause = np.full((n, length), -1, np.int32)
  clause[:, 10:30] = 2
  out = np.asarray(losses.corrupt_values(jax.random.key(0), tokens, clause, 1000))
  assert np.all(out[:, 0] == caption_lib.DEC)
  np.testing.assert_array_equal(out[:, 1:10], 100)
  np.testing.assert_array_equal(out[:, 30:], 100)
  span = out[:, 10:30]
  assert abs(np.mean(span == caption_lib.MASK) - 0.5) < 0.02
  changed_random = np.mean((span != caption_lib.MASK) & (span != 100))
  assert abs(changed_random - 0.1) < 0.02 and np.all(span[span != caption_lib.MASK] > caption_lib.SEP)


def test_reconstruction_counts_value_targets_and_span_ends_with_label_smoothing():
  rng = np.random.default_rng(2)
  b, length, v = 3, 8, 11
  logits = rng.normal(size=(b, length, v)).astype(np.float32)
  tokens = rng.integers(6, v, size=(b, length)).astype(np.int32)
  clause = np.full((b, length), -1, np.int32)
  clause[:, 2:4] = 0       # a value span, then its separator
  tokens[:, 4] = caption_lib.SEP
  clause[:, 6:] = 1        # the last clause's value reaches the end: no end to count
  w = np.array([1, 0.5, 0], np.float32)
  loss, _ = losses.reconstruction(logits, tokens, clause, w, smoothing=0.1)
  logp = _log_softmax(logits[:, :-1], -1)
  total, norm = 0.0, 0.0
  for i in range(b):
    for t in range(length - 1):
      end = clause[i, t] >= 0 and clause[i, t + 1] < 0
      if (clause[i, t + 1] >= 0 or end) and w[i] > 0:
        target = caption_lib.SEP if end else tokens[i, t + 1]
        per = 0.9 * -logp[i, t, target] + 0.1 * -logp[i, t].mean()
        total += w[i] * per
        norm += w[i]
  np.testing.assert_allclose(loss, total / norm, rtol=1e-5)


def test_reconstruction_teaches_where_a_value_ends():
  """The decoder writes a value until it emits [SEP] (predict.caption): the position after a
  value span is a target, [SEP] even where the caption's last value is followed by PAD."""
  length, v = 8, 11
  tokens = np.array([[caption_lib.DEC, 7, 8, 9, caption_lib.SEP, 7, 10, caption_lib.PAD]],
                    np.int32)
  clause = np.array([[-1, -1, 0, 0, -1, -1, 1, -1]], np.int32)
  targets = np.concatenate([tokens[:, 1:], [[caption_lib.PAD]]], axis=1)
  perfect = np.full((1, length, v), -30.0, np.float32)
  perfect[0, np.arange(length), targets[0]] = 30.0  # right on every token, PAD after the end
  ends_at_sep = perfect.copy()
  ends_at_sep[0, 6] = -30.0
  ends_at_sep[0, 6, caption_lib.SEP] = 30.0         # after the last value: [SEP], not PAD
  w = np.ones((1,), np.float32)
  loss_pad, m_pad = losses.reconstruction(perfect, tokens, clause, w, smoothing=0.0)
  loss_sep, m_sep = losses.reconstruction(ends_at_sep, tokens, clause, w, smoothing=0.0)
  assert float(loss_sep) < 1e-6 < float(loss_pad)
  assert float(m_sep["reconstruct/token_accuracy"]) == 1.0
  assert abs(float(m_pad["reconstruct/token_accuracy"]) - 0.8) < 1e-6  # 3 values + 2 ends


def _smoke_config(**loss):
  config = pretrain.get_config("smoke")
  config.loss.update(loss)
  return config


@pytest.fixture(scope="module")
def smoke_model():
  """(smoke config, a smoke-sized model), built once (jitted: eager init is slow on CPU)."""
  config = _smoke_config()
  return config, nnx.jit(lambda: Model(config.model, rngs=nnx.Rngs(0)))()


def _batch(config, n=6, seed=0):
  rng = np.random.default_rng(seed)
  m = config.model
  tokens = rng.integers(6, m.text.vocab_size, (n, 16)).astype(np.int32)
  tokens[:, 0] = caption_lib.ENC
  return {"image": rng.normal(size=(n, m.image_size, m.image_size, m.channels)).astype(
              np.float32),
          "tokens": tokens, "clause": np.full_like(tokens, -1),
          "clause_tokens": tokens[:, :8].copy(),  # one clause alone (clause contrast)
          "weight": np.ones((n,), np.float32)}


def _embed(model, batch):
  return predict.embed_images(model, batch["image"])[0], predict.embed_texts(model,
                                                                            batch["tokens"])


def _masked_softmax(logits):
  """Row-wise softmax over the off-diagonal entries (a negative is never the positive)."""
  logits = np.where(np.eye(logits.shape[0], dtype=bool), -np.inf, logits)
  return np.exp(_log_softmax(logits, 1))


def test_hard_negatives_draw_in_proportion_to_softmax_of_the_logits():
  scale = 1 / 0.07
  cosine = np.array([[1.0, 0.9, 0.1, 0.0],
                     [0.2, 1.0, 0.3, 0.1],
                     [0.0, 0.0, 1.0, 0.0],
                     [0.5, 0.4, 0.3, 1.0]], np.float32)
  tokens = np.arange(4 * 5).reshape(4, 5).astype(np.int32) + 6
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.vmap(lambda k: losses.hard_negatives(k, scale * cosine, np.ones(4), tokens)[0])
  picks = np.asarray(draw(keys))
  freq = np.stack([np.mean(picks == j, axis=0) for j in range(4)], axis=1)
  np.testing.assert_allclose(freq, _masked_softmax(scale * cosine), atol=0.03)
  assert freq[0, 1] > 0.99  # the hardest negative, not a third of the draws (uniform)


def test_total_draws_hard_negatives_from_the_temperature_scaled_similarities(smoke_model,
                                                                            monkeypatch):
  """BLIP draws a negative in proportion to softmax(cosine / temperature): drawn from the
  softmax of raw cosines in [-1, 1] it is close to uniform, rarely a hard one."""
  _, model = smoke_model
  config = _smoke_config(reconstruct_weight=0.0)
  batch = _batch(config)
  real, seen = losses.hard_negatives, []

  def spy(rng, logits, weights, tokens):
    seen.append(logits)
    return real(rng, logits, weights, tokens)

  monkeypatch.setattr(losses, "hard_negatives", spy)

  @nnx.jit
  def drawn_from(model, batch):  # what total hands to the draw
    objectives.total(model, batch, jax.random.key(0), config)
    return seen[-1]

  logits = drawn_from(model, batch)
  zimg, ztxt = _embed(model, batch)
  expected = _masked_softmax(float(model.temperature_scale()) * np.asarray(zimg @ ztxt.T))
  keys = jax.random.split(jax.random.key(1), 4000)
  picks = np.asarray(jax.vmap(
      lambda k: real(k, logits, batch["weight"], batch["tokens"])[0])(keys))
  freq = np.stack([np.mean(picks == j, axis=0) for j in range(len(picks[0]))], axis=1)
  np.testing.assert_allclose(freq, expected, atol=0.03,
                             err_msg="negatives not drawn from softmax(scale * cosine)")


def _queue_setup(seed=0, b=6, q=5, e=8):
  rng = np.random.default_rng(seed)
  zimg, ztxt, zimg_m, ztxt_m = (_unit(rng.normal(size=(b, e))).astype(np.float32)
                                for _ in range(4))
  img_queue, txt_queue = (_unit(rng.normal(size=(q, e))).astype(np.float32) for _ in range(2))
  return zimg, ztxt, zimg_m, ztxt_m, img_queue, txt_queue


def test_queue_loss_passes_no_gradient_to_the_temperature_through_its_targets():
  """ALBEF computes the momentum targets without gradient: the temperature is not trained
  through its own targets."""
  zimg, ztxt, zimg_m, ztxt_m, img_queue, txt_queue = _queue_setup()
  w = np.ones(6, np.float32)

  def loss(scale, target_scale):
    sim_i2t = target_scale * zimg_m @ np.concatenate([ztxt_m, txt_queue]).T
    sim_t2i = target_scale * ztxt_m @ np.concatenate([zimg_m, img_queue]).T
    targets = losses.distillation_targets(sim_i2t, sim_t2i, 0.4)
    return losses.queue_contrastive(zimg, ztxt, img_queue, txt_queue, scale, w, targets)[0]

  grad = jax.grad(lambda s: loss(s, s))(12.0)
  reference = jax.grad(lambda s: loss(s, jax.lax.stop_gradient(s)))(12.0)
  np.testing.assert_allclose(grad, reference, rtol=1e-5)


def test_distillation_targets_put_no_mass_on_invalid_batch_columns():
  sim = jax.random.normal(jax.random.key(0), (4, 7))
  w = np.array([1, 0, 1, 1], np.float32)
  a, b = map(np.asarray, losses.distillation_targets(sim, sim, 0.4, w))
  valid = w > 0  # (the invalid row keeps its one-hot part; the loss leaves that row out)
  np.testing.assert_array_equal(a[valid, 1], 0.0)
  np.testing.assert_array_equal(b[valid, 1], 0.0)
  np.testing.assert_allclose(a[valid].sum(1), 1.0, rtol=1e-6)


def test_momentum_queue_loss_with_an_invalid_example_equals_the_loss_without_it(smoke_model):
  """An example of weight 0 is masked out of the loss's columns: its momentum similarity must
  not carry target mass there (that made one invalid example cost about 1e9)."""
  config, model = smoke_model
  momentum_model = model  # as at the start of training (an EMA of the model)
  batch = _batch(config)
  batch["weight"][2] = 0.0
  rng = np.random.default_rng(1)
  queues = tuple(_unit(rng.normal(size=(5, config.model.embed_dim))).astype(np.float32)
                 for _ in range(2))
  scale = model.temperature_scale()

  def loss(batch):
    zimg, ztxt = _embed(model, batch)
    _, targets = objectives.momentum_targets(momentum_model, batch, queues, scale, 0.4)
    return float(losses.queue_contrastive(zimg, ztxt, *queues, scale, batch["weight"],
                                          targets)[0])

  full = loss(batch)
  assert np.isfinite(full) and full < 100, f"loss with one weight-0 example: {full}"
  keep = batch["weight"] > 0
  np.testing.assert_allclose(full, loss({k: v[keep] for k, v in batch.items()}), rtol=1e-5)


def test_clause_contrast_treats_images_with_the_same_clause_as_positives(pair):
  """Two images whose drawn clause is the same text share the target: exchanging their clause
  embeddings changes nothing, whereas one-hot InfoNCE would push them apart."""
  zimg, zclause = (jnp.asarray(z) for z in pair)
  b = zimg.shape[0]
  tokens = jnp.arange(b)[:, None] + jnp.zeros((b, 4), jnp.int32)
  tokens = tokens.at[1].set(tokens[0])  # rows 0 and 1: the same clause text
  weights = jnp.ones(b)
  swapped = zclause.at[0].set(zclause[1]).at[1].set(zclause[0])
  loss, _ = losses.clause_contrastive(zimg, zclause, 10.0, weights, tokens)
  loss_swapped, _ = losses.clause_contrastive(zimg, swapped, 10.0, weights, tokens)
  np.testing.assert_allclose(loss, loss_swapped, rtol=1e-6)
  plain, _ = losses.contrastive(zimg, zclause, 10.0, weights)
  plain_swapped, _ = losses.contrastive(zimg, swapped, 10.0, weights)
  assert abs(float(plain) - float(plain_swapped)) > 1e-3
  distinct = jnp.arange(b)[:, None] + jnp.zeros((b, 4), jnp.int32)
  np.testing.assert_allclose(losses.clause_contrastive(zimg, zclause, 10.0, weights, distinct)[0],
                             plain, rtol=1e-6)
  invalid = weights.at[2].set(0.0)
  assert float(losses.clause_contrastive(zimg, zclause, 10.0, invalid, tokens)[0]) < 100


def test_clause_rivals_match_numpy_leaving_out_padding_and_rowless_examples():
  """Each image's clause against its own rivals only: cross-entropy with the clause at index 0,
  padded rivals left out, a row with no rival (or weight 0) adding nothing."""
  rng = np.random.default_rng(1)
  b, r, e, scale = 4, 3, 5, 10.0
  zimg, zclause = _unit(rng.normal(size=(b, e))), _unit(rng.normal(size=(b, e)))
  zrivals = _unit(rng.normal(size=(b, r, e)))
  has = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], np.int32)
  weights = np.array([1.0, 0.5, 1.0, 0.0], np.float32)
  loss, m = losses.clause_rivals(*(jnp.asarray(x, jnp.float32) for x in
                                   (zimg, zclause, zrivals)), scale, weights, has)
  nll, correct = [], []
  for i in (0, 1):  # row 2 has no rival, row 3 weight 0
    logits = scale * np.concatenate([[zimg[i] @ zclause[i]], zrivals[i, has[i] > 0] @ zimg[i]])
    nll.append(-_log_softmax(logits, 0)[0])
    correct.append(float(np.argmax(logits) == 0))
  np.testing.assert_allclose(loss, (nll[0] + 0.5 * nll[1]) / 1.5, rtol=1e-5)
  np.testing.assert_allclose(m["clause_rivals/accuracy"], np.mean(correct), rtol=1e-6)
  # a padded rival, however close to the image, does not count
  near = zrivals.copy()
  near[1, 1] = zimg[1]
  np.testing.assert_allclose(losses.clause_rivals(
      *(jnp.asarray(x, jnp.float32) for x in (zimg, zclause, near)), scale, weights, has)[0],
      loss, rtol=1e-6)


def test_total_adds_the_clause_rivals_under_the_clause_contrast_weight(smoke_model):
  """loss.clause_rivals > 0: the batch's `rival_tokens` reach the loss, weighted by
  clause_contrast_weight; without the clause contrast no rivals are asked for."""
  _, model = smoke_model
  config = _smoke_config(match_weight=0.0, reconstruct_weight=0.0, clause_rivals=2,
                         clause_contrast_weight=0.5)
  batch = _batch(config)
  rng = np.random.default_rng(4)
  batch["rival_tokens"] = rng.integers(6, config.model.text.vocab_size, (6, 2, 8)).astype(
      np.int32)
  batch["has_rival"] = np.ones((6, 2), np.int32)
  total, (metrics, _) = nnx.jit(lambda m, b: objectives.total(m, b, jax.random.key(3),
                                                              config))(model, batch)
  zimg = predict.embed_images(model, batch["image"])[0]
  zclause = predict.embed_texts(model, batch["clause_tokens"])
  zrivals = predict.embed_texts(model, batch["rival_tokens"].reshape(12, 8)).reshape(6, 2, -1)
  expected, _ = losses.clause_rivals(zimg, zclause, zrivals, model.temperature_scale(),
                                     batch["weight"], batch["has_rival"])
  np.testing.assert_allclose(metrics["clause_rivals/loss"], expected, rtol=1e-4)
  np.testing.assert_allclose(total, metrics["contrast/loss"] + 0.5 * (
      metrics["clause_contrast/loss"] + expected), rtol=1e-4)
  assert objectives.clause_rival_count(config) == 2
  config.loss.clause_contrast_weight = 0.0
  with pytest.raises(ValueError, match="clause_rivals=2 needs .* clause contrast on"):
    objectives.clause_rival_count(config)


@pytest.mark.parametrize("mask_p,random_p", [(0.0, 0.0), (1.0, 0.0)])
def test_total_corrupts_the_decoder_input_at_the_configured_rates(smoke_model, mask_p,
                                                                   random_p):
  """loss.reconstruct_mask_p / reconstruct_random_p reach the decoder's input: at 0 / 0 the
  decoder reads the clean caption (teacher forcing), at 1 / 0 every value token is [MASK]."""
  _, model = smoke_model
  config = _smoke_config(contrast_weight=0.0, match_weight=0.0, reconstruct_mask_p=mask_p,
                         reconstruct_random_p=random_p)
  batch = _batch(config)
  batch["clause"][:, 5:9] = 1
  decoder_input = batch["tokens"].copy()
  decoder_input[:, 0] = caption_lib.DEC
  if mask_p:
    decoder_input[:, 5:9] = caption_lib.MASK
  _, (metrics, _) = nnx.jit(lambda m, b: objectives.total(m, b, jax.random.key(3), config))(
      model, batch)
  image_tokens = predict.embed_images(model, batch["image"])[1]
  expected, _ = losses.reconstruction(model.decode_logits(image_tokens, decoder_input),
                                      batch["tokens"], batch["clause"], batch["weight"],
                                      config.loss.label_smoothing)
  np.testing.assert_allclose(metrics["reconstruct/loss"], expected, rtol=1e-5)
