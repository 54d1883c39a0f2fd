"""Builds a dataset in the KLIP record schema (TFDS, ArrayRecord) and writes its build report.

    python -m klip.data.prepare --dataset=synthetic --data_dir=data --num_chips=4000

The dataset lands in DATA_DIR/NAME/CONFIG/VERSION; the last line printed is the value to give
training as `--config.data.dataset`. Building is idempotent: an existing dataset is reused.
"""

from __future__ import annotations

import importlib
import time

from absl import app
from absl import flags

from klip.data import report as report_lib

_DATASET = flags.DEFINE_string("dataset", "synthetic", "Builder module in klip.data.builders.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Root directory of prepared datasets.")
_NUM_CHIPS = flags.DEFINE_integer("num_chips", 1000, "synthetic: number of chips (all splits).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "synthetic: chip size in pixels.")
_CHANNELS = flags.DEFINE_integer("channels", 2, "synthetic: polarisation channels (1 or 2).")
_SEED = flags.DEFINE_integer("seed", 0, "synthetic: simulator seed.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Generator processes (0: all cores).")


def prepare(dataset: str, data_dir: str, **options):
  """Builds (or reuses) a dataset; returns (builder, report)."""
  try:
    module = importlib.import_module(f"klip.data.builders.{dataset}")
  except ModuleNotFoundError as e:
    raise ValueError(f"unknown dataset {dataset!r}: no module klip.data.builders.{dataset}") from e
  builder = module.builder(data_dir, **options)
  start = time.time()
  builder.download_and_prepare()
  report = report_lib.build_report(builder, time.time() - start)
  report_lib.write(report)
  return builder, report


def main(argv):
  del argv
  options = {}
  if _DATASET.value == "synthetic":
    options = dict(num_chips=_NUM_CHIPS.value, image_size=_IMAGE_SIZE.value,
                   channels=_CHANNELS.value, seed=_SEED.value, workers=_WORKERS.value)
  builder, report = prepare(_DATASET.value, _DATA_DIR.value, **options)
  print(report_lib.to_markdown(report))
  print(f"dataset: {builder.name}/{builder.builder_config.name}")


if __name__ == "__main__":
  app.run(main)
