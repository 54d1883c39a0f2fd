"""Counting: the count question of `evals.answers` on the target chips of `split`.

The predicted count is the VQA answer to "How many targets are there?" (closed set: the
counts of `answers_split` and `split`). Metrics: `mae` (mean absolute error) and `accuracy`
(exact count), both with 95 % bootstrap intervals; for reference `chance` (the exact accuracy
of a uniform guess among the candidate counts) and `mae_median` (the MAE of always answering
the median count of `answers_split`), and the number of `questions`. The report shows the
predicted-vs-true count matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from matplotlib.figure import Figure

from evals import answers as answers_lib
from evals import stats


def scores(predicted: np.ndarray, true: np.ndarray) -> list[tuple[str, float]]:
  """`mae` and exact `accuracy` (with intervals) of predicted against true counts [N]."""
  predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
  return [*stats.with_ci("mae", np.abs(predicted - true)),
          *stats.with_ci("accuracy", (predicted == true).astype(np.float64))]


def count_matrix(predicted: np.ndarray, true: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Pairs [C, C] over the sorted `counts`: row = true count, column = predicted count."""
  index = {int(c): i for i, c in enumerate(counts)}
  m = np.zeros((len(counts), len(counts)), np.int64)
  np.add.at(m, ([index[int(t)] for t in true], [index[int(p)] for p in predicted]), 1)
  return m


def _figure(m: np.ndarray, counts: np.ndarray) -> Figure:
  size = 2.5 + 0.35 * len(counts)
  fig = Figure(figsize=(size + 1.0, size))
  ax = fig.add_subplot()
  im = ax.imshow(m, cmap="Blues", origin="lower")
  ax.plot([-0.5, len(counts) - 0.5], [-0.5, len(counts) - 0.5], color="grey", lw=0.8)
  ax.set_xticks(range(len(counts)), counts)
  ax.set_yticks(range(len(counts)), counts)
  ax.set_xlabel("predicted count")
  ax.set_ylabel("true count")
  for i, j in zip(*np.nonzero(m)):
    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
  fig.colorbar(im, ax=ax, fraction=0.046, label="chips")
  return fig


class Evaluator:
  """Count accuracy and error on the target chips of `split` of dataset `data`."""

  def __init__(self, predictor, datasets, *, data: str, split: str, answers_split: str,
               scorer: str = "match", max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.split, self.answers_split = data, split, answers_split
    self.scorer = scorer
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    split = self.datasets.split(self.data, self.split, max_examples=self.max_examples)
    reference = self.datasets.split(self.data, self.answers_split)
    question = answers_lib.QUESTIONS["count"]
    result = answers_lib.ask(self.predictor, question, split, reference,
                             answers_lib.images(self.predictor, split), self.scorer)
    if result is None:
      raise ValueError(f"{self.data}:{self.split} has no chip with a known count")
    true = np.array([min(r) for r in result.right])
    predicted = np.array(result.predicted)
    yield from scores(predicted, true)
    yield "chance", float(result.chance.mean())
    reference_counts = [min(r) for r in question.truth(reference) if r]
    median = np.median(reference_counts) if reference_counts else np.median(true)
    yield "mae_median", float(np.abs(true - median).mean())
    yield "questions", float(len(true))
    counts = np.array(result.options)
    artifacts.figure("predicted vs true count", _figure(count_matrix(predicted, true, counts),
                                                        counts))
