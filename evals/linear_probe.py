"""Linear probe: multinomial logistic regression on frozen image features.

Features: the `pooled` image vector before projection (`ViT.pool`), standardised with the
training split's mean and standard deviation. Recipe: full-batch L-BFGS (scipy) from zero
weights on the mean cross-entropy plus (l2 / 2) * |W|^2 (the bias is not penalised), at most
`epochs` iterations; everything is deterministic, so a checkpoint always gets the same probe.
The probe is trained on `train_split` and scored on `split`; a class of `split` unseen in
training is never predicted, so its examples count as errors.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.optimize

from evals import classes as classes_lib


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Features centred and scaled by the training mean and standard deviation (a constant
  feature is only centred)."""
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > 1e-6, std, 1.0)
  return [(x - mean) / std for x in (train, *others)]


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float,
                 max_iter: int) -> tuple[np.ndarray, np.ndarray]:
  """(W [D, C], b [C]) minimising mean cross-entropy + l2/2 |W|^2 of labels y [N] in [0, C)."""
  x = np.asarray(x, np.float64)
  n, d = x.shape
  onehot = np.eye(num_classes)[y]

  def loss_and_grad(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -(onehot * logp).sum() / n + 0.5 * l2 * (w * w).sum()
    g = (np.exp(logp) - onehot) / n
    return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

  theta = np.zeros(d * num_classes + num_classes)
  result = scipy.optimize.minimize(loss_and_grad, theta, jac=True, method="L-BFGS-B",
                                   options=dict(maxiter=max_iter))
  return result.x[:d * num_classes].reshape(d, num_classes), result.x[d * num_classes:]


class Evaluator:
  """A linear probe for `label`, trained on `train_split` and scored on `split` of `data`.

  num_classes counts the classes seen in training (those the probe can predict).
  """

  def __init__(self, predictor, datasets, *, data: str, label: str, train_split: str,
               split: str, l2: float = 1e-3, epochs: int = 200,
               max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.label = data, label
    self.train_split, self.split = train_split, split
    self.l2, self.epochs = l2, epochs
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    train, train_labels = classes_lib.labelled(self.datasets, self.data, self.train_split,
                                               self.label, self.max_examples)
    test, test_labels = classes_lib.labelled(self.datasets, self.data, self.split, self.label,
                                             self.max_examples)
    seen = sorted(set(train_labels))
    names = sorted(set(seen).union(test_labels))
    x_train, x_test = standardise(self.predictor.split_features(train).pooled,
                                  self.predictor.split_features(test).pooled)
    w, b = fit_logistic(x_train, classes_lib.encode(train_labels, seen), len(seen),
                        l2=self.l2, max_iter=self.epochs)
    to_names = classes_lib.encode(seen, names)  # probe output -> index into names
    pred = to_names[np.argmax(x_test @ w + b, axis=-1)]
    target = classes_lib.encode(test_labels, names)
    yield from classes_lib.scores(pred, target, len(seen))
    yield "num_train_examples", float(len(train_labels))
    classes_lib.report(artifacts, names, pred, target)
