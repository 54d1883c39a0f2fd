"""Retrieval: rank and recall maths by hand, ITM re-ranking, the evaluator on the smoke run."""

import os

import numpy as np
import pytest

from evals import retrieval
from evals.artifacts import Artifacts


def test_perfect_embeddings_rank_every_true_candidate_first():
  z = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 12)))[0]  # orthonormal rows
  similarity = z @ z.T
  assert np.array_equal(retrieval.ranks(similarity), np.zeros(12))
  assert retrieval.recall_at_k(retrieval.ranks(similarity), 1).mean() == 1.0


def test_ranks_by_hand_with_ties_in_stable_order():
  similarity = np.array([[0.5, 0.9, 0.1],    # true 0.5 below 0.9: rank 1
                         [0.7, 0.7, 0.2],    # tie with column 0 (lower index first): rank 1
                         [0.3, 0.3, 0.3]])   # three-way tie, true is last: rank 2
  ranks = retrieval.ranks(similarity)
  assert ranks.tolist() == [1, 1, 2]
  assert retrieval.recall_at_k(ranks, 1).tolist() == [0, 0, 0]
  assert retrieval.recall_at_k(ranks, 2).tolist() == [1, 1, 0]
  assert retrieval.top_k(similarity, 2).tolist() == [[1, 0], [0, 1], [0, 1]]


@pytest.mark.parametrize("k", [0, 1, 3, 7, 8, 20])
def test_top_k_is_the_stable_argsort_prefix(k):
  """The partition-based top_k returns a stable descending argsort's first k, ties and all."""
  rng = np.random.default_rng(k)
  scores = [rng.normal(size=(30, 8)), rng.integers(0, 3, size=(30, 8)).astype(np.float32),
            np.zeros((4, 8)), rng.normal(size=(5, 8)).round(1)]
  for s in scores:
    want = np.argsort(-s, axis=1, kind="stable")[:, :k]
    assert np.array_equal(retrieval.top_k(s, k), want)
  with_nan = scores[0].copy()
  with_nan[2, 5] = np.nan
  assert np.array_equal(retrieval.top_k(with_nan, k),
                        np.argsort(-with_nan, axis=1, kind="stable")[:, :k])


def test_constant_scores_give_exactly_chance():
  ranks = retrieval.ranks(np.zeros((50, 50)))
  assert np.array_equal(ranks, np.arange(50))
  for k in retrieval.KS:
    assert retrieval.recall_at_k(ranks, k).mean() == k / 50


def test_random_model_scores_about_chance():
  rng = np.random.default_rng(0)
  n = 2000
  image, text = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
  ranks = retrieval.ranks(image @ text.T)
  assert abs(ranks.mean() / (n - 1) - 0.5) < 0.03  # uniform ranks
  for k in (10, 100):
    chance = k / n
    assert abs(retrieval.recall_at_k(ranks, k).mean() - chance) < 4 * np.sqrt(chance / n) + 1e-3


def test_shuffled_captions_lose_the_perfect_score():
  z = np.linalg.qr(np.random.default_rng(1).normal(size=(40, 40)))[0]
  shuffled = np.random.default_rng(2).permutation(40)
  ranks = retrieval.ranks(z @ z[shuffled].T)
  assert np.array_equal(ranks == 0, shuffled == np.arange(40))


def test_non_finite_or_non_square_similarity_is_an_error():
  with pytest.raises(ValueError, match="non-finite"):
    retrieval.ranks(np.array([[np.nan, 0.0], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="square"):
    retrieval.ranks(np.zeros((2, 3)))


def test_reranking_reorders_only_the_candidates():
  similarity = np.array([[0.2, 0.9, 0.8, 0.1],   # candidates [1, 2], true 0 outside: keeps 2
                         [0.9, 0.8, 0.1, 0.0],   # candidates [0, 1]: ITM puts true 1 first
                         [0.1, 0.2, 0.9, 0.8],   # candidates [2, 3]: ITM tie keeps cosine order
                         [0.1, 0.2, 0.9, 0.8]])  # candidates [2, 3]: ITM puts 2 first
  ranks = retrieval.ranks(similarity)
  candidates = retrieval.top_k(similarity, 2)
  scores = np.array([[0.1, 0.9], [0.2, 0.7], [0.5, 0.5], [0.9, 0.1]])
  assert ranks.tolist() == [2, 1, 0, 1]
  assert retrieval.reranked_ranks(ranks, candidates, scores).tolist() == [2, 0, 0, 1]


def test_mean_recall_is_the_mean_of_the_six():
  rng = np.random.default_rng(3)
  i2t, t2i = rng.integers(0, 30, 60), rng.integers(0, 30, 60)
  got = dict(retrieval.recalls("itm/", i2t, t2i))
  six = [got[f"itm/{d}/R@{k}"] for d in ("i2t", "t2i") for k in retrieval.KS]
  assert list(got)[0] == "itm/mean_recall"
  assert got["itm/mean_recall"] == pytest.approx(np.mean(six))
  assert got["itm/i2t/R@1"] == np.mean(i2t < 1)
  for name in ["itm/mean_recall"] + [f"itm/t2i/R@{k}" for k in retrieval.KS]:
    assert got[f"{name}/ci_low"] <= got[name] <= got[f"{name}/ci_high"]


def test_evaluator_on_smoke_checkpoint(smoke_predictor, eval_datasets, tmp_path):
  artifacts = Artifacts(str(tmp_path), "retrieval")
  evaluator = retrieval.Evaluator(smoke_predictor, eval_datasets, data="synthetic", split="test",
                                  rerank_k=4)
  got = dict(evaluator.run(artifacts))
  n = got["num_examples"]
  assert n == len(eval_datasets.split("synthetic", "test")) >= 10
  for prefix in ("", "itm/"):
    names = [f"{prefix}{d}/R@{k}" for d in ("i2t", "t2i") for k in retrieval.KS]
    assert got[f"{prefix}mean_recall"] == pytest.approx(np.mean([got[m] for m in names]))
    for name in names + [f"{prefix}mean_recall"]:
      assert 0.0 <= got[f"{name}/ci_low"] <= got[name] <= got[f"{name}/ci_high"] <= 1.0
    for name in names:  # a fraction of the n queries
      assert got[name] * n == pytest.approx(round(got[name] * n))
    for d in ("i2t", "t2i"):
      assert got[f"{prefix}{d}/R@1"] <= got[f"{prefix}{d}/R@5"] <= got[f"{prefix}{d}/R@10"]
  for d in ("i2t", "t2i"):  # re-ranking the first 4 leaves R@5 and R@10 as they were
    assert got[f"itm/{d}/R@5"] == got[f"{d}/R@5"] and got[f"itm/{d}/R@10"] == got[f"{d}/R@10"]
  assert any("Image → text" in m for m in artifacts.markdown)
  assert any("Text → image" in m and ("✓" in m or "✗" in m) for m in artifacts.markdown)
  figure = tmp_path / "retrieval_top_images_retrieved_for_the_first_caption_queries.png"
  assert os.path.getsize(figure) > 0

  plain = dict(retrieval.Evaluator(smoke_predictor, eval_datasets, data="synthetic",
                                   split="test", rerank_k=0).run(Artifacts(str(tmp_path), "r0")))
  assert not any(k.startswith("itm/") for k in plain)
  assert plain["mean_recall"] == got["mean_recall"]
