"""What the classification evaluators (zeroshot, linear_probe, knn) share: labelled splits,
class indices, the metric maths and the confusion-matrix report.

Metrics (pure numpy) of predicted and true class indices into one class list:
`accuracy` (top-1) and `mean_per_class_accuracy` (the mean recall over the classes present in
the scored split), both with 95 % bootstrap intervals, and `num_classes`, `num_examples`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from evals import data as data_lib
from evals import stats


def labelled(datasets: data_lib.Datasets, data: str, split: str, label: str,
             max_examples: int | None = None) -> tuple[data_lib.Split, list[str]]:
  """The records of a split that carry `label` (see `evals.data.labels`) and their labels."""
  s = datasets.split(data, split, max_examples=max_examples)
  names = data_lib.labels(s, label)
  rows = [i for i, n in enumerate(names) if n]
  if not rows:
    raise ValueError(f"{data}:{split} has no {label!r} labels in its {len(s)} examples")
  return s.subset(rows), [names[i] for i in rows]


def encode(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
  """Class indices [N] of labels into `classes`."""
  index = {c: i for i, c in enumerate(classes)}
  return np.array([index[n] for n in labels], np.int64)


# ----- metric maths ----------------------------------------------------------------------------
def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [C, C]: row = true class, column = predicted class."""
  return np.bincount(target * num_classes + pred,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """Recall [C] of each class; NaN for a class absent from `target`."""
  m = confusion(pred, target, num_classes)
  totals = m.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, np.diag(m) / totals, np.nan)


def _mean_per_class(pairs: np.ndarray) -> float:
  """Mean recall over the classes present, of rows (pred, target)."""
  pred, target = pairs[:, 0], pairs[:, 1]
  return float(np.nanmean(per_class_accuracy(pred, target, int(pairs.max()) + 1)))


def scores(pred: np.ndarray, target: np.ndarray, num_classes: int):
  """(name, value) pairs of predictions `pred` [N] against `target` [N] (class indices)."""
  pred, target = np.asarray(pred, np.int64), np.asarray(target, np.int64)
  return [*stats.with_ci("accuracy", (pred == target).astype(np.float64)),
          *stats.with_ci("mean_per_class_accuracy", np.stack([pred, target], axis=1),
                         _mean_per_class),
          ("num_classes", float(num_classes)), ("num_examples", float(len(target)))]


# ----- report ----------------------------------------------------------------------------------
def report(artifacts, classes: Sequence[str], pred: np.ndarray, target: np.ndarray) -> None:
  """A row-normalised confusion-matrix figure and a per-class table (examples, accuracy, how
  often the class is predicted)."""
  c = len(classes)
  m = confusion(pred, target, c)
  rows = m.sum(axis=1, keepdims=True)
  size = 2.5 + 0.35 * c
  fig = Figure(figsize=(size + 1.0, size))
  ax = fig.add_subplot()
  fraction = m / np.maximum(rows, 1)
  im = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(c), classes, rotation=90)
  ax.set_yticks(range(c), classes)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if c <= 20:
    for i, j in zip(*np.nonzero(m)):
      ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
              color="white" if fraction[i, j] > 0.5 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
  artifacts.figure("confusion matrix", fig)
  recall = per_class_accuracy(pred, target, c)
  artifacts.table("per-class accuracy", ("class", "examples", "accuracy", "predicted"),
                  [(name, int(rows[i, 0]), float(recall[i]) if rows[i, 0] else "-",
                    int(m[:, i].sum())) for i, name in enumerate(classes)])
