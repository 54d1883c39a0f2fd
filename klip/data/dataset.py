"""Opening a prepared dataset: `DATA_DIR/NAME/CONFIG/VERSION`, ArrayRecord written by TFDS.

A mixture is named by joining datasets with "+" ("synthetic/n4000_s64_c2_seed0+mstar/
depression17"): its split is the concatenation of the parts' splits, so each part contributes
in proportion to its size and every record keeps one index in the whole.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds


class DatasetMissingError(FileNotFoundError):
  pass


def _how_to_build(data_dir: str, name: str) -> str:
  builder_name, _, config = name.partition("/")
  options = " --source=<the archive's folder>" if builder_name != "synthetic" else ""
  if builder_name == "synthetic" and config:
    from klip.data.builders import synthetic  # pylint: disable=g-import-not-at-top
    options = "".join(f" --{k}={v}" for k, v in synthetic.config_options(config).items())
  return f"python -m klip.data.prepare --dataset={builder_name} --data_dir={data_dir}{options}"


def dataset_dir(data_dir: str, name: str) -> str:
  """The versioned directory of a prepared dataset `name` ("builder/config")."""
  root = os.path.join(data_dir, name)
  versions = sorted(v for v in (os.listdir(root) if os.path.isdir(root) else ())
                    if os.path.isfile(os.path.join(root, v, "dataset_info.json")))
  if not versions:
    raise DatasetMissingError(
        f"no prepared dataset {name!r} under {data_dir!r} (looked for {root}/VERSION/"
        f"dataset_info.json). Build it with:\n  {_how_to_build(data_dir, name)}")
  return os.path.join(root, versions[-1])


def builder(data_dir: str, name: str) -> tfds.core.DatasetBuilder:
  path = dataset_dir(data_dir, name)
  try:
    return tfds.builder_from_directory(path)
  except Exception as e:  # a corrupt dataset_info.json / features.json
    raise DatasetMissingError(f"dataset {path} cannot be read ({e}); delete it and rebuild with:"
                              f"\n  {_how_to_build(data_dir, name)}") from e


MIXTURE = "+"


def parts(name: str) -> list[str]:
  """The datasets of a mixture name (one for a plain name)."""
  return name.split(MIXTURE)


class ConcatSource:
  """Random access over several sources one after another."""

  def __init__(self, sources):
    self._sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {len(self)}")
    part = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[part - 1]) if part else 0
    return self._sources[part][index - start]


def source(data_dir: str, name: str, split: str):
  """A random-access source of decoded records for one split (of a dataset or a mixture)."""
  if MIXTURE in name:
    return ConcatSource(source(data_dir, part, split) for part in parts(name))
  b = builder(data_dir, name)
  if split not in b.info.splits:
    raise DatasetMissingError(f"dataset {name!r} has no split {split!r}; it has "
                              f"{sorted(b.info.splits)}")
  return b.as_data_source(split=split)


def fingerprint(data_dir: str, name: str) -> str:
  """Identifies a prepared dataset (or mixture) by its name, features and per-split shard
  lengths."""
  if MIXTURE in name:
    joined = ",".join(fingerprint(data_dir, part) for part in parts(name))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
  b = builder(data_dir, name)
  payload = {
      "name": name,
      "features": str(b.info.features),
      "splits": {s: list(b.info.splits[s].shard_lengths) for s in sorted(b.info.splits)},
  }
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
