"""The learning benchmark's tasks (bench/learning.py): their labels, splits and the scores of
features on them (zero-shot prompts, linear probe, k-NN, the pixel reference)."""

from __future__ import annotations

import dataclasses
import datetime

from bench import common  # noqa: F401  # before jax: the CPU platform unless JAX_PLATFORMS is set

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order

from evals import answers as answers_lib  # pylint: disable=g-import-not-at-top
from evals import data as data_lib  # pylint: disable=g-import-not-at-top
from evals import knn as knn_lib  # pylint: disable=g-import-not-at-top
from evals import linear_probe  # pylint: disable=g-import-not-at-top
from evals import zeroshot  # pylint: disable=g-import-not-at-top
from evals.predictor import Predictor  # pylint: disable=g-import-not-at-top
from klip.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top

PIXEL_LIMIT = 4096  # input values per image above which the pixel probe pools 2x2 first


@dataclasses.dataclass(frozen=True)
class Task:
  name: str   # the table row
  data: str   # key of the eval config's datasets
  label: str  # subtype, category, count, dominant_landcover, position, terrain


TASKS = (
    Task("mstar_subtype", "mstar", "subtype"),
    Task("opensarship_subtype", "opensarship", "subtype"),
    Task("synthetic_category", "synthetic", "category"),
    Task("synthetic_count", "synthetic", "count"),
    Task("synthetic_landcover", "synthetic", "dominant_landcover"),
    Task("synthetic_position", "synthetic", "position"),
    Task("synthetic_terrain", "synthetic", "terrain"),
)


def log(msg: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Labels, prompts and scores (a label is a set of right answers: one for every task but
# position).
# ---------------------------------------------------------------------------------------------
def label_sets(split: data_lib.Split, label: str) -> list[frozenset]:
  """Right answers per record of `split`; an empty set where the record has no such label."""
  if label in ("count", "position"):  # evals/answers.py's ground truth (target chips)
    return answers_lib.QUESTIONS[label].truth(split)
  return [frozenset({n}) if n else frozenset() for n in data_lib.labels(split, label)]


def prompts(label: str, name) -> list[str]:
  """The zero-shot prompts of class `name`: count and position as evals/answers.py writes
  their candidates (one caption clause), the others evals/zeroshot.py's ensemble; [] where the
  label has no clause to put a class name in."""
  if label in ("count", "position"):
    return list(answers_lib.QUESTIONS[label].texts(name))
  return zeroshot.class_prompts(label, str(name))


def accuracy(pred, sets: list[frozenset]) -> float:
  return float(np.mean([p in s for p, s in zip(pred, sets, strict=True)]))


def chance(sets: list[frozenset]) -> float:
  """The accuracy of the best constant answer (the majority share)."""
  classes = sorted(frozenset().union(*sets))
  return max(float(np.mean([c in s for s in sets])) for c in classes)


def expand(sets: list[frozenset], classes: list) -> tuple[np.ndarray, np.ndarray]:
  """(row index, class index) per right answer: a chip with k right answers is k rows."""
  index = {c: i for i, c in enumerate(classes)}
  pairs = [(i, index[c]) for i, s in enumerate(sets) for c in sorted(s)]
  return (np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64))


def probe_accuracy(x_fit, fit_sets, x_test, test_sets, *, l2: float, epochs: int) -> float:
  """evals/linear_probe.py's recipe; a multi-label chip is one row per right answer."""
  seen = sorted(frozenset().union(*fit_sets))
  rows, y = expand(fit_sets, seen)
  x_fit, x_test = linear_probe.standardise(x_fit, x_test)
  w, b = linear_probe.fit_logistic(x_fit[rows], y, len(seen), l2=l2, max_iter=epochs)
  pred = np.argmax(x_test @ w + b, axis=-1)
  return accuracy([seen[i] for i in pred], test_sets)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_accuracy(x_fit, fit_sets, x_test, test_sets, *, k: int) -> float:
  """evals/knn.py's vote on standardised, unit-normalised features."""
  seen = sorted(frozenset().union(*fit_sets))
  rows, y = expand(fit_sets, seen)
  x_fit, x_test = linear_probe.standardise(x_fit, x_test)
  pred = knn_lib.knn_predict(_unit(x_fit)[rows], y, _unit(x_test), len(seen), k)
  return accuracy([seen[i] for i in pred], test_sets)


def pixel_features(predictor: Predictor, lab, cache: dict) -> tuple[np.ndarray, int]:
  """The model inputs of a labelled split's chips flattened, 2x2-pooled when large;
  (features, pool factor). `cache` keeps each whole split's pixels for the other tasks."""
  key = (lab.full.name, lab.full.split, len(lab.full))
  if key not in cache:
    images = predictor.images(lab.full.records)
    n, s, _, c = images.shape
    factor = 2 if s * s * c > PIXEL_LIMIT and s % 2 == 0 else 1
    if factor > 1:
      images = images.reshape(n, s // 2, 2, s // 2, 2, c).mean(axis=(2, 4))
    cache[key] = (images.reshape(n, -1), factor)
  x, factor = cache[key]
  return x[lab.rows], factor


# ---------------------------------------------------------------------------------------------
# Splits of each task.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Labelled:
  full: data_lib.Split    # the whole split (its features are computed once for all tasks)
  rows: np.ndarray        # the records of `full` that carry the task's label
  sets: list[frozenset]   # their right answers

  @property
  def split(self) -> data_lib.Split:
    return self.full.subset(self.rows)

  def pooled(self, predictor: Predictor) -> np.ndarray:
    return predictor.split_features(self.full).pooled[self.rows]

  def embedding(self, predictor: Predictor) -> np.ndarray:
    return predictor.split_features(self.full).embedding[self.rows]


class NoLabels(ValueError):
  """A split without a single record carrying the task's label."""


def labelled(split: data_lib.Split, label: str) -> Labelled:
  sets = label_sets(split, label)
  rows = [i for i, s in enumerate(sets) if s]
  if not rows:
    raise NoLabels(f"{split.name}:{split.split} has no {label!r} labels in its {len(split)} "
                     "examples")
  return Labelled(split, np.array(rows, np.int64), [sets[i] for i in rows])


@dataclasses.dataclass
class TaskData:
  task: Task
  fit: Labelled | None = None
  test: Labelled | None = None
  ceiling_train: Labelled | None = None
  ceiling_source: str = ""
  skipped: str = ""


def _pretraining_split(run, name: str) -> bool:
  return name in dataset_lib.parts(run.data.dataset)


def read_split(data_dir: str, key: str, name: str, split: str, limit: int) -> data_lib.Split:
  """A split read directly, without evals/data.py's held-out check (the ceiling trains on the
  pretraining split)."""
  source = dataset_lib.source(data_dir, name, split)
  rows = data_lib.spread(len(source), limit)
  return data_lib.Split(key, name, split, [source[int(i)] for i in rows])


FITS = ("held_out", "train")


def task_data(datasets: data_lib.Datasets, specs, run, data_dir: str, *, max_examples: int,
              ceiling: bool, fit: str = "held_out") -> list[TaskData]:
  """Fit, test and ceiling-training splits of every task; skipped tasks say why.

  fit: "held_out" fits the probes on a split the run did not pretrain on (synthetic and a
  pretrained-on archive: val; others: train); "train" fits them on every task's train split,
  the pretraining split included (read without the held-out check), the linear-probe protocol
  of SimCLR and MAE: the probe sees the images pretraining saw, never the test split.
  """
  if fit not in FITS:
    raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
  out, train_splits = [], {}  # each pretraining train split read once for all its tasks
  for task in TASKS:
    td = TaskData(task)
    out.append(td)
    name = specs[task.data].name
    in_pretraining = _pretraining_split(run, name) and run.data.split == "train"
    held_out = fit == "held_out" and (task.data == "synthetic" or in_pretraining)
    fit_split = "val" if held_out else "train"
    try:
      # the pretraining data's train split: the ceiling's training data, and the probes' with
      # fit="train"
      train = None
      if in_pretraining and (ceiling or not held_out):
        if name not in train_splits:
          train_splits[name] = read_split(data_dir, task.data, name, "train", max_examples)
        train = labelled(train_splits[name], task.label)
      td.fit = (train if train is not None and not held_out else
                labelled(datasets.split(task.data, fit_split), task.label))
      td.test = labelled(datasets.split(task.data, "test"), task.label)
      if ceiling:  # the pretraining data's train split, else the task's only labelled data
        td.ceiling_train = train if train is not None else td.fit
        td.ceiling_source = f"{name}:{'train' if train is not None else fit_split}"
    except (dataset_lib.DatasetMissingError, data_lib.HeldOutError, NoLabels) as e:
      td.skipped = str(e).splitlines()[0]
      log(f"{task.name}: skipped: {td.skipped}")
      continue
    log(f"{task.name}: fit {name}:{fit_split} ({len(td.fit.sets)} chips), test {name}:test "
        f"({len(td.test.sets)} chips)"
        + (f", ceiling trains on {td.ceiling_source} ({len(td.ceiling_train.sets)} chips)"
           if td.ceiling_train else ""))
  return out
