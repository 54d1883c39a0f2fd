"""Classification across two collections: fit on one prepared collection, score on another.

Its standard use is MSTAR's standard operating condition (SOC): the ten targets imaged at 17 deg
depression are the training collection and the same targets at 15 deg the test collection (a
2 deg change of viewing geometry, otherwise the same conditions). The frozen model is scored on
the test collection (`data`, `split`) three ways:

- `zeroshot/...`: zero-shot classification (`evals.zeroshot`; nothing is fitted);
- `probe/...`: the linear probe (`evals.linear_probe`), fitted on `train_data`'s `train_split`;
- `knn/...`: k-NN (`evals.knn`) against `train_data`'s `train_split`.

These are the existing evaluators, run on two pseudo-splits built here ("fit": the training
collection, "test": the test collection), so recipes, metrics and reports are theirs.

Splits: "+"-joined names ("val+test") or "all" (every split the prepared collection has): the
SOC protocol uses whole collections, so the builder's aspect-block splits only matter for what
the held-out rule allows. Every split is opened through `Datasets.split`, so that rule holds on
the fitting side too: a run that pretrained on the 17 deg collection's train split (the `small`
pretraining variant) fits on its val+test only. The two collections must not share an example id
(the probe would be scored on its own training images): that is refused with HeldOutError.

A collection that is missing and cannot be prepared (e.g. no 15 deg folder under source_root)
raises DatasetMissingError, which the job records as "skipped: <reason>".
"""

from __future__ import annotations

from collections.abc import Iterator

from evals import artifacts as artifacts_lib
from evals import data as data_lib
from evals import knn
from evals import linear_probe
from evals import zeroshot
from klip.data import dataset as dataset_lib

FIT, TEST = "fit", "test"  # the pseudo-splits the wrapped evaluators see


def split_names(datasets: data_lib.Datasets, key: str, splits: str) -> list[str]:
  """The split names of a "+"-joined list, or every split of dataset `key` for "all"."""
  if splits == "all":
    return datasets.split_names(key)
  names = [s for s in splits.split("+") if s]
  if not names:
    raise ValueError(f"no split named in {splits!r}: give 'all' or names joined by '+'")
  return names


def collection(datasets: data_lib.Datasets, key: str, splits: str) -> data_lib.Split:
  """The records of `splits` of dataset `key` as one Split (its `split`: the joined names)."""
  parts = [datasets.split(key, s) for s in split_names(datasets, key, splits)]
  return data_lib.Split(key, parts[0].name, "+".join(p.split for p in parts),
                        [r for p in parts for r in p.records])


class _Pair:
  """What the wrapped evaluators see as their datasets: a "fit" and a "test" split."""

  def __init__(self, fit: data_lib.Split, test: data_lib.Split):
    self._splits = {FIT: fit, TEST: test}

  def split(self, key: str, split: str, *, max_examples: int | None = None) -> data_lib.Split:
    del key  # the evaluators' `data`: the split names which collection
    s = self._splits[split]
    return s.subset(data_lib.spread(len(s), max_examples)) if max_examples else s


class Evaluator:
  """Zero-shot, linear-probe and k-NN classification by `label` of `split` of `data`, the probe
  and k-NN fitted on `train_split` of `train_data` (see the module docstring)."""

  def __init__(self, predictor, datasets, *, train_data: str, data: str, label: str = "subtype",
               train_split: str = "all", split: str = "all", prompts: str = "ensemble",
               l2: float = 1e-3, epochs: int = 200, k: int = 10,
               max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.train_data, self.data = train_data, data
    self.train_split, self.split = train_split, split
    common = dict(data=data, label=label, max_examples=max_examples)
    # Built here so a bad option (e.g. prompts) fails before any data is read.
    self.methods = {
        "zeroshot": zeroshot.Evaluator(predictor, None, split=TEST, prompts=prompts, **common),
        "probe": linear_probe.Evaluator(predictor, None, train_split=FIT, split=TEST, l2=l2,
                                        epochs=epochs, **common),
        "knn": knn.Evaluator(predictor, None, train_split=FIT, split=TEST, k=k, **common),
    }

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    # The test collection first: when it is missing, the evaluator is skipped before any work.
    try:
      test = collection(self.datasets, self.data, self.split)
    except dataset_lib.DatasetMissingError as e:
      raise dataset_lib.DatasetMissingError(
          f"test collection {self.data!r} is not available: {e}") from e
    fit = collection(self.datasets, self.train_data, self.train_split)
    shared = set(fit.ids).intersection(test.ids)
    if shared:
      raise data_lib.HeldOutError(
          f"{len(shared)} examples of {test.name}:{test.split} are also in the fitting "
          f"collection {fit.name}:{fit.split} (e.g. {sorted(shared)[:3]}); the two must be "
          "different collections")
    artifacts.text(f"Fitted on `{fit.name}:{fit.split}` ({len(fit)} examples), scored on "
                   f"`{test.name}:{test.split}` ({len(test)} examples).")
    pair = _Pair(fit, test)
    for method, evaluator in self.methods.items():
      evaluator.datasets = pair
      sub = artifacts_lib.Artifacts(artifacts.directory, f"{artifacts.name}_{method}")
      for name, value in evaluator.run(sub):
        yield f"{method}/{name}", value
      artifacts.text(f"### {method}")
      artifacts.markdown.extend(sub.markdown)
