"""Opening a prepared dataset: `DATA_DIR/NAME/CONFIG/VERSION`, ArrayRecord written by TFDS."""

from __future__ import annotations

import hashlib
import json
import os

import tensorflow_datasets as tfds


class DatasetMissingError(FileNotFoundError):
  pass


def _how_to_build(data_dir: str, name: str) -> str:
  builder_name, _, config = name.partition("/")
  options = ""
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


def source(data_dir: str, name: str, split: str):
  """A random-access source of decoded records for one split."""
  b = builder(data_dir, name)
  if split not in b.info.splits:
    raise DatasetMissingError(f"dataset {name!r} has no split {split!r}; it has "
                              f"{sorted(b.info.splits)}")
  return b.as_data_source(split=split)


def fingerprint(data_dir: str, name: str) -> str:
  """Identifies a prepared dataset by its name, features and per-split shard lengths."""
  b = builder(data_dir, name)
  payload = {
      "name": name,
      "features": str(b.info.features),
      "splits": {s: list(b.info.splits[s].shard_lengths) for s in sorted(b.info.splits)},
  }
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
