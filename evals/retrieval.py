"""Image-text retrieval both ways over a split's (image, caption) pairs, with ITM re-ranking.

Every image of the split has one caption (its record's own): the true candidate of image query i
is caption i, and of caption query i is image i. Candidates are ranked by the cosine similarity
of the unit image and text embeddings (the contrastive score); recall@k of a direction is the
fraction of queries whose true candidate is among the first k.

Ties: each query's candidates are ordered by descending score with a stable sort (ties keep
index order), so the true candidate's rank is the number of candidates scoring higher plus the
tied candidates of lower index. A degenerate model that scores every pair alike thus gets
R@k = k/N (chance), never a perfect score.

ITM re-ranking (rerank_k > 0): each query's first rerank_k candidates are re-ordered by the
matching head's probability (stable again: ties keep the cosine order); a true candidate outside
them keeps its cosine rank. Reported as `itm/...`; R@k for k >= rerank_k is unchanged by it.

Metrics: `mean_recall`, the mean of `i2t/R@k` and `t2i/R@k` for k in 1, 5, 10, then those six,
each with a 95 % bootstrap interval over queries; then `num_examples`. For mean_recall a
bootstrap row is pair i: the mean of the six hits of image query i and caption query i, so the
mean over rows is exactly the mean of the six recalls.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from matplotlib.figure import Figure

from evals import stats
from klip.data import schema

KS = (1, 5, 10)
EXAMPLES = 4     # queries shown per direction in the report
SHOWN = 3        # retrieved candidates listed per example query
GRID = 5         # retrieved images per text query in the figure


def ranks(similarity: np.ndarray) -> np.ndarray:
  """0-based rank [N] of each query row's true candidate (row q: column q) of a square
  similarity [N, N], in the stable descending order."""
  s = np.asarray(similarity, np.float64)
  if s.ndim != 2 or s.shape[0] != s.shape[1]:
    raise ValueError(f"similarity must be square, got shape {s.shape}")
  if not np.all(np.isfinite(s)):
    raise ValueError("similarity has non-finite values")
  true = np.diagonal(s)[:, None]
  index = np.arange(s.shape[0])
  lower = index[None, :] < index[:, None]
  return np.sum(s > true, axis=1) + np.sum((s == true) & lower, axis=1)


def recall_at_k(query_ranks: np.ndarray, k: int) -> np.ndarray:
  """Per-query hits [N] (1.0 where the true candidate's 0-based rank is below k)."""
  return (np.asarray(query_ranks) < k).astype(np.float64)


def top_k(similarity: np.ndarray, k: int) -> np.ndarray:
  """Indices [N, min(k, M)] of each row's first k candidates in the stable descending order
  (ties by index): the order of a stable argsort of the whole row, without sorting it. A
  partition finds each row's k-th score; only the candidates at or above it are sorted."""
  s = -np.asarray(similarity)
  n, m = s.shape
  k = min(k, m)
  if not 0 < k < m or not np.all(np.isfinite(s)):  # NaNs: argsort's own order, last
    return np.argsort(s, axis=1, kind="stable")[:, :k]
  kth = np.partition(s, k - 1, axis=1)[:, k - 1:k]
  rows, cols = np.nonzero(s <= kth)  # at least k per row, ascending index within a row
  order = np.lexsort((cols, s[rows, cols], rows))
  cols = cols[order]
  first = np.searchsorted(rows[order], np.arange(n))
  return cols[first[:, None] + np.arange(k)]


def reranked_ranks(query_ranks: np.ndarray, candidates: np.ndarray,
                   scores: np.ndarray) -> np.ndarray:
  """Ranks [N] of the true candidates once each row's `candidates` [N, K] (its `top_k`) are
  re-ordered by `scores` [N, K] (descending, stable); a true candidate outside them keeps its
  rank, `query_ranks` (`ranks` of the same similarity)."""
  order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
  reordered = np.take_along_axis(candidates, order, axis=1)
  found = reordered == np.arange(len(reordered))[:, None]
  return np.where(found.any(axis=1), found.argmax(axis=1), query_ranks)


def recalls(prefix: str, i2t_ranks: np.ndarray, t2i_ranks: np.ndarray
            ) -> Iterator[tuple[str, float]]:
  """mean_recall, then R@k both ways, with intervals, from the true candidates' ranks."""
  hits = {f"{prefix}{direction}/R@{k}": recall_at_k(r, k)
          for direction, r in (("i2t", i2t_ranks), ("t2i", t2i_ranks)) for k in KS}
  yield from stats.with_ci(f"{prefix}mean_recall", np.mean(list(hits.values()), axis=0))
  for name, h in hits.items():
    yield from stats.with_ci(name, h)


class Evaluator:
  """Retrieval between the images and captions of `split` of dataset `data`."""

  def __init__(self, predictor, datasets, *, data: str, split: str, rerank_k: int = 16,
               max_examples: int | None = None):
    if rerank_k < 0:
      raise ValueError(f"rerank_k must be >= 0, got {rerank_k}")
    self.predictor = predictor
    self.datasets = datasets
    self.data = data
    self.split = split
    self.rerank_k = rerank_k
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    split = self.datasets.split(self.data, self.split, max_examples=self.max_examples)
    captions = split.texts("caption")
    tokens = self.predictor.tokens(captions)
    similarity = (self.predictor.split_features(split).embedding
                  @ self.predictor.embed_texts(tokens).T)
    i2t_ranks, t2i_ranks = ranks(similarity), ranks(similarity.T)
    yield from recalls("", i2t_ranks, t2i_ranks)
    k = min(self.rerank_k, len(split))
    if k:
      i2t, t2i = top_k(similarity, k), top_k(similarity.T, k)
      queries = np.repeat(np.arange(len(split))[:, None], k, axis=1)
      image_tokens = self.predictor.split_image_tokens(split)
      probs = self._pair_probs(image_tokens, tokens, np.concatenate([queries, t2i]),
                               np.concatenate([i2t, queries]))
      yield from recalls("itm/", reranked_ranks(i2t_ranks, i2t, probs[:len(split)]),
                         reranked_ranks(t2i_ranks, t2i, probs[len(split):]))
    yield "num_examples", float(len(split))
    self._report(artifacts, split, captions, similarity, i2t_ranks, t2i_ranks)

  def _pair_probs(self, image_tokens: np.ndarray, tokens: np.ndarray, images: np.ndarray,
                  texts: np.ndarray) -> np.ndarray:
    """ITM probabilities of the (image, text) index pairs images[q, j], texts[q, j]; a pair
    that both directions rank is scored once."""
    n = len(tokens)
    keys, inverse = np.unique(images * n + texts, return_inverse=True)
    chunk = 16 * self.predictor.batch_size  # bounds the gathered image tokens in memory
    probs = np.concatenate([
        self.predictor.match_prob(image_tokens[keys[i:i + chunk] // n],
                                  tokens[keys[i:i + chunk] % n])
        for i in range(0, len(keys), chunk)])
    return probs[inverse.reshape(images.shape)]

  def _report(self, artifacts, split, captions: list[str], similarity: np.ndarray,
              i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> None:
    n = len(split)
    ids = split.ids
    artifacts.text(f"{n} image-caption pairs of {split.name}:{split.split}; chance R@k = k/{n}.")
    mark = lambda hit: "✓" if hit else "✗"
    shown = min(SHOWN, n)
    i2t, t2i = top_k(similarity, shown), top_k(similarity.T, min(GRID, n))
    queries = range(min(EXAMPLES, n))
    artifacts.table(
        "Image → text: top captions (their field values) of the first image queries",
        ["query image", "true rank"] + [f"#{j + 1}" for j in range(shown)],
        [[ids[q], int(i2t_ranks[q]) + 1]
         + [f"{mark(c == q)} {ids[c]}: {_gist(split.records[c])}" for c in i2t[q]]
         for q in queries])
    artifacts.table(
        "Text → image: top images of the first caption queries",
        ["query", "caption", "true rank"] + [f"#{j + 1}" for j in range(shown)],
        [[f"q{q + 1}", captions[q], int(t2i_ranks[q]) + 1]
         + [f"{mark(c == q)} {ids[c]}" for c in t2i[q, :shown]] for q in queries])
    artifacts.figure("Top images retrieved for the first caption queries",
                     _grid([[split.records[q]] + [split.records[c] for c in t2i[q]]
                            for q in queries],
                           [[c == q for c in t2i[q]] for q in queries]))


def _gist(record: dict, width: int = 90) -> str:
  """The start of a record's field values, "; "-joined (its caption without the templates)."""
  text = "; ".join(schema.text_of(v) for v in record["field_values"])
  return text if len(text) <= width else text[:width - 1] + "…"


def _grid(records: list[list[dict]], hits: list[list[bool]]) -> Figure:
  """One row per query: its true image (blue frame), then the retrieved images (first channel,
  2-98 % stretch), framed green on a hit and red otherwise."""
  rows, cols = len(records), len(records[0])
  fig = Figure(figsize=(1.8 * cols, 1.9 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for r, c in np.ndindex(rows, cols):
    ax, record = axes[r, c], records[r][c]
    image = schema.decode_image(record)[..., 0]
    low, high = np.percentile(image, [2, 98])
    ax.imshow(image, cmap="gray", vmin=low, vmax=high)
    ax.set_xticks([])
    ax.set_yticks([])
    colour = "tab:blue" if c == 0 else "tab:green" if hits[r][c - 1] else "tab:red"
    for spine in ax.spines.values():
      spine.set_color(colour)
      spine.set_linewidth(3)
    name = schema.text_of(record["id"])
    ax.set_title(f"true {name}" if c == 0 else f"#{c} {name}", fontsize=7)
    if c == 0:
      ax.set_ylabel(f"q{r + 1}")
  return fig
