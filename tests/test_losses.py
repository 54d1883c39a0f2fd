"""Each objective against a small reference computed in numpy."""

import jax
import numpy as np
import pytest

from klip import losses
from klip.data import tokenizer as tok


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
  assert np.all(out[:, 0] == tok.DEC)
  np.testing.assert_array_equal(out[:, 1:10], 100)
  np.testing.assert_array_equal(out[:, 30:], 100)
  span = out[:, 10:30]
  assert abs(np.mean(span == tok.MASK) - 0.5) < 0.02
  changed_random = np.mean((span != tok.MASK) & (span != 100))
  assert abs(changed_random - 0.1) < 0.02 and np.all(span[span != tok.MASK] > tok.SEP)


def test_reconstruction_counts_only_value_targets_with_label_smoothing():
  rng = np.random.default_rng(2)
  b, length, v = 3, 6, 11
  logits = rng.normal(size=(b, length, v)).astype(np.float32)
  tokens = rng.integers(6, v, size=(b, length)).astype(np.int32)
  clause = np.full((b, length), -1, np.int32)
  clause[:, 2:4] = 0
  w = np.array([1, 0.5, 0], np.float32)
  loss, _ = losses.reconstruction(logits, tokens, clause, w, smoothing=0.1)
  logp = _log_softmax(logits[:, :-1], -1)
  total, norm = 0.0, 0.0
  for i in range(b):
    for t in range(length - 1):
      if clause[i, t + 1] >= 0 and w[i] > 0:
        per = 0.9 * -logp[i, t, tokens[i, t + 1]] + 0.1 * -logp[i, t].mean()
        total += w[i] * per
        norm += w[i]
  np.testing.assert_allclose(loss, total / norm, rtol=1e-5)
