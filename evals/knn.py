"""k-nearest-neighbour classification on frozen image embeddings.

Features: the unit `embedding` (the shared image-text space), compared by cosine similarity.
Each scored image takes its k most similar `train_split` images (ties by the lower training
index) and each neighbour votes for its class with weight exp(similarity / TEMPERATURE), the
weighted vote of Wu et al. (2018) used by DINO; a tie between classes goes to the first class in
sorted order. A class absent from `train_split` is never predicted, so its examples count as
errors.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from evals import classes as classes_lib

TEMPERATURE = 0.07


def knn_predict(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, num_classes: int,
                k: int) -> np.ndarray:
  """Class indices [M] of unit vectors test [M, E] by a weighted vote of their k most similar
  unit vectors train [N, E] with classes train_y [N] in [0, C)."""
  sim = np.asarray(test, np.float64) @ np.asarray(train, np.float64).T
  k = min(k, train.shape[0])
  nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / TEMPERATURE)
  votes = np.zeros((test.shape[0], num_classes))
  np.add.at(votes, (np.arange(test.shape[0])[:, None], train_y[nearest]), weights)
  return np.argmax(votes, axis=1)


class Evaluator:
  """k-NN classification by `label` of `split` of `data` against `train_split`.

  num_classes counts the classes of `train_split` (those k-NN can predict).
  """

  def __init__(self, predictor, datasets, *, data: str, label: str, train_split: str,
               split: str, k: int = 10, max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.label = data, label
    self.train_split, self.split = train_split, split
    self.k = k
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    train, train_labels = classes_lib.labelled(self.datasets, self.data, self.train_split,
                                               self.label, self.max_examples)
    test, test_labels = classes_lib.labelled(self.datasets, self.data, self.split, self.label,
                                             self.max_examples)
    names = sorted(set(train_labels).union(test_labels))
    pred = knn_predict(self.predictor.split_features(train).embedding,
                       classes_lib.encode(train_labels, names),
                       self.predictor.split_features(test).embedding, len(names), self.k)
    target = classes_lib.encode(test_labels, names)
    yield from classes_lib.scores(pred, target, len(set(train_labels)))
    yield "num_train_examples", float(len(train_labels))
    classes_lib.report(artifacts, names, pred, target)
