"""Evaluation data: splits of prepared datasets, prepared on demand, checked to be held out.

The eval config names datasets (`config.datasets.<key>`: a builder/config `name` and, for real
archives, a `source` path relative to `config.source_root` and optional builder `options`, e.g.
MSTAR's `depression_deg`). A real archive is prepared on first use under
DATA_DIR/<builder>-<hash of its source path (and options, if any)>, so pointing `source_root` at
other data of the same layout never reuses a dataset built from different files or options; the
prepared dataset must be the one `name` names. A split an evaluator scores must not share an
example id with the pretraining run's training data; that is checked the first time the split
is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from klip.data import dataset as dataset_lib
from klip.data import schema
from klip.data import splits as splits_lib


class HeldOutError(RuntimeError):
  """An evaluation split shares examples with the pretraining data."""


@dataclasses.dataclass
class Split:
  """The decoded records of one split of a prepared dataset."""
  dataset: str  # the key in config.datasets
  name: str     # builder/config
  split: str
  records: list[dict]

  def __len__(self) -> int:
    return len(self.records)

  @property
  def ids(self) -> list[str]:
    return [schema.text_of(r["id"]) for r in self.records]

  def texts(self, field: str) -> list[str]:
    """A text feature of every record (e.g. "caption", "family", "region_function")."""
    return [schema.text_of(r[field]) for r in self.records]

  def subset(self, rows: Sequence[int]) -> Split:
    return dataclasses.replace(self, records=[self.records[int(i)] for i in rows])


def spread(n: int, limit: int) -> np.ndarray:
  """Row indices of a capped split: `limit` rows evenly spread over n (all when limit is 0),
  so a small cap still covers classes that builders write one after another."""
  if not limit or limit >= n:
    return np.arange(n)
  return np.linspace(0, n - 1, limit).round().astype(int)


def _ids(source) -> set[str]:
  return {schema.text_of(source[i]["id"]) for i in range(len(source))}


class Datasets:
  """Opens evaluation splits for the evaluators of one eval job.

  datasets: config.datasets (key -> {name, source, options}); data_dir: where prepared
  datasets live; source_root: the folder real-archive `source` paths are relative to; pretrain:
  the training run's config.data (its `data_dir`, `dataset` and `split`), whose ids no eval
  split may hold.
  """

  def __init__(self, datasets, *, data_dir: str, source_root: str, pretrain,
               max_examples: int = 0, prepare_workers: int = 1):
    self._specs = datasets
    self._data_dir = data_dir
    self._source_root = source_root
    self._pretrain = pretrain
    self._max_examples = max_examples
    self._workers = prepare_workers
    self._cache: dict[tuple[str, str], Split] = {}
    self._pretrain_ids: set[str] | None = None
    self._unchecked: list[str] = []

  def split(self, key: str, split: str, *, max_examples: int | None = None) -> Split:
    """The records of `split` of dataset `key` (the first max_examples; 0: all).

    Raises DatasetMissingError (with the reason) when the dataset is neither prepared nor
    preparable from its source, HeldOutError when it overlaps the pretraining data.
    """
    limit = self._max_examples if max_examples is None else max_examples
    if (key, split) not in self._cache:
      data_dir, name = self._locate(key)
      source = dataset_lib.source(data_dir, name, split)
      rows = spread(len(source), self._max_examples)
      split_obj = Split(key, name, split, [source[int(i)] for i in rows])
      if split == self._pretrain.split and name in dataset_lib.parts(self._pretrain.dataset):
        raise HeldOutError(f"{key}: split {split!r} of {name} is the pretraining split")
      self._check_held_out(split_obj)
      self._cache[(key, split)] = split_obj
    split_obj = self._cache[(key, split)]
    return split_obj if not limit else split_obj.subset(spread(len(split_obj), limit))

  def split_names(self, key: str) -> list[str]:
    """The splits dataset `key` has (preparing it on first use), train, val, test first.

    Raises DatasetMissingError like `split`.
    """
    data_dir, name = self._locate(key)
    names = list(dataset_lib.builder(data_dir, name).info.splits)
    order = {s: i for i, s in enumerate(splits_lib.SPLITS)}
    return sorted(names, key=lambda s: (order.get(s, len(order)), s))

  def _locate(self, key: str) -> tuple[str, str]:
    if key not in self._specs:
      raise KeyError(f"no dataset {key!r} in the eval config; it has {sorted(self._specs)}")
    spec = self._specs[key]
    builder_name = spec.name.partition("/")[0]
    if not spec.get("source"):  # synthetic: the embedded corpus, built if missing
      try:
        dataset_lib.dataset_dir(self._data_dir, spec.name)
      except dataset_lib.DatasetMissingError:
        if builder_name != "synthetic":
          raise
        from klip.data.builders import synthetic  # pylint: disable=g-import-not-at-top
        self._prepare("synthetic", self._data_dir,
                      **synthetic.config_options(spec.name.partition("/")[2]))
      return self._data_dir, spec.name
    source = os.path.abspath(os.path.join(self._source_root, spec.source))
    options = spec.get("options") or {}
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    # Without options the tag is the source path's alone (directories prepared before options
    # existed stay valid); options that do not show in the config name still get their own.
    tagged = source + (json.dumps(options, sort_keys=True) if options else "")
    tag = hashlib.sha256(tagged.encode()).hexdigest()[:8]
    data_dir = os.path.join(self._data_dir, f"{builder_name}-{tag}")
    try:
      dataset_lib.dataset_dir(data_dir, spec.name)
    except dataset_lib.DatasetMissingError:
      if not os.path.exists(source):
        raise dataset_lib.DatasetMissingError(
            f"{key}: source {source} does not exist (config source_root="
            f"{self._source_root!r}, datasets.{key}.source={spec.source!r})") from None
      built = self._prepare(builder_name, data_dir, source=source, **options)
      if built != spec.name:
        raise ValueError(f"{key}: preparing {source} with options {options} gives {built}, "
                         f"not datasets.{key}.name={spec.name!r}; set datasets.{key}.options "
                         "to the builder options of that config (e.g. depression_deg for "
                         "mstar/depression15)")
    return data_dir, spec.name

  def _prepare(self, builder_name: str, data_dir: str, **options) -> str:
    """Builds a dataset under data_dir; returns its builder/config name."""
    from klip.data import prepare  # pylint: disable=g-import-not-at-top
    print(f"preparing {builder_name} from {options.get('source')} under {data_dir}", flush=True)
    builder, report = prepare.prepare(builder_name, data_dir,
                                      generator=prepare.make_generator("rules", data_dir),
                                      workers=self._workers, **options)
    sizes = {k: v["examples"] for k, v in report["splits"].items()}
    name = f"{builder.name}/{builder.builder_config.name}"
    print(f"prepared {name}: {sizes}", flush=True)
    return name

  def _check_held_out(self, split: Split) -> None:
    p = self._pretrain
    if self._pretrain_ids is None:
      self._pretrain_ids, self._unchecked = set(), []
      for part in dataset_lib.parts(p.dataset):
        try:
          self._pretrain_ids |= _ids(dataset_lib.source(p.data_dir, part, p.split))
        except dataset_lib.DatasetMissingError:
          self._unchecked.append(part)  # the pretraining data is not on this machine
    # Ids are namespaced by builder: only a split of the same builder can overlap.
    builder_name = split.name.partition("/")[0]
    missing = [part for part in self._unchecked if part.partition("/")[0] == builder_name]
    if missing:
      raise HeldOutError(
          f"{split.dataset}: cannot check {split.name}:{split.split} against the pretraining "
          f"data {missing} (not found under {p.data_dir})")
    shared = self._pretrain_ids.intersection(split.ids)
    if shared:
      raise HeldOutError(
          f"{split.dataset}: {len(shared)} examples of {split.name}:{split.split} are in the "
          f"pretraining split (e.g. {sorted(shared)[:3]}); evaluate on a held-out split")


def labels(split: Split, key: str) -> list[str]:
  """Class names of a split's records by `key`:

  - "subtype": the first instance's finer class (MSTAR class, AIS ship type);
  - "category": the first instance's category (ship, aircraft, vehicle, storage_tank);
  - "dominant_landcover": the most frequent land-cover class of the mask;
  - any text feature ("region_function", "terrain", ...).
  A record without the label gets "" (evaluators drop those).
  """
  from klip.data import chip as chip_lib  # pylint: disable=g-import-not-at-top
  out = []
  for r in split.records:
    if key in ("subtype", "category"):
      values = r["instance_subtypes" if key == "subtype" else "instance_categories"]
      out.append(schema.text_of(values[0]) if len(values) else "")
    elif key == "dominant_landcover":
      mask = schema.decode_landcover(r)
      if mask is None:
        out.append("")
      else:
        counts = np.bincount(mask.ravel(), minlength=len(chip_lib.LANDCOVER_CLASSES))
        out.append(chip_lib.LANDCOVER_CLASSES[int(np.argmax(counts[:len(
            chip_lib.LANDCOVER_CLASSES)]))])
    else:
      out.append(schema.text_of(r[key]))
  return out
