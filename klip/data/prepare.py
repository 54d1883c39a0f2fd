"""Builds a dataset in the KLIP record schema (TFDS, ArrayRecord) and writes its build report.

    python -m klip.data.prepare --dataset=synthetic --data_dir=data --num_chips=4000
    python -m klip.data.prepare --dataset=opensarship --source=../shared/data/opensarship \
        --data_dir=data
    python -m klip.data.prepare --dataset=mstar --source=../shared/data/mstar/train --data_dir=data
    # MSTAR's 15 deg collection (the SOC test set; dataset mstar/depression15):
    python -m klip.data.prepare --dataset=mstar --source=/data/my_mstar/test --depression_deg=15
    python -m klip.data.prepare --dataset=manifest --source=my_archive/manifest.jsonl \
        --data_dir=data
    # full scenes with boxes / land-cover masks, for the detection and segmentation evaluators:
    python -m klip.data.prepare --dataset=hrsid --source=../shared/data/hrsid_samples
    python -m klip.data.prepare --dataset=polsf --source=../shared/data/polsf
    # texts from an OpenAI-compatible server instead of the offline rules:
    python -m klip.data.prepare --dataset=mstar --source=... --backend=llm \
        --llm_url=http://localhost:8000/v1 --llm_model=MODEL

The dataset lands in DATA_DIR/NAME/CONFIG/VERSION; the last line printed is the value to give
training as `--config.data.dataset`. Building is idempotent: an existing dataset is reused
(delete its directory to rebuild). Texts come from the HCoT generator (`klip.hcot`).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from absl import app
from absl import flags

from klip.data import report as report_lib

# The text generator: the layer above this one (klip/hcot writes text from chips, so it
# imports klip.data), named here and loaded by name so that data imports nothing above it.
# Builders take any object with `generate(chip)`; the report, one with `check`.
GENERATOR = "klip.hcot.generator"

_DATASET = flags.DEFINE_string("dataset", "synthetic",
                               "Builder module in klip.data.builders: synthetic, opensarship, "
                               "mstar, manifest, hrsid, polsf.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Root directory of prepared datasets.")
_SOURCE = flags.DEFINE_string("source", None, "Real archives: the source folder (opensarship, "
                              "mstar, hrsid, polsf) or manifest JSONL file (manifest).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: all cores).")
_NUM_CHIPS = flags.DEFINE_integer("num_chips", 1000, "synthetic: number of chips (all splits).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "synthetic: chip size in pixels.")
_CHANNELS = flags.DEFINE_integer("channels", 2, "synthetic: polarisation channels (1 or 2).")
_SEED = flags.DEFINE_integer("seed", 0, "synthetic: simulator seed.")
_BACKEND = flags.DEFINE_enum("backend", "rules", ["rules", "llm"], "HCoT text backend.")
_LLM_URL = flags.DEFINE_string("llm_url", "http://localhost:8000/v1",
                               "llm: base URL of an OpenAI-compatible server.")
_LLM_MODEL = flags.DEFINE_string("llm_model", None, "llm: model name served there.")
_LLM_CACHE = flags.DEFINE_string("llm_cache", None,
                                 "llm: answer cache (default DATA_DIR/.hcot_cache); a rerun "
                                 "resumes from it.")
_LLM_KEY_ENV = flags.DEFINE_string("llm_api_key_env", "KLIP_LLM_API_KEY",
                                   "llm: environment variable holding the API key, if any.")
_LLM_RATE = flags.DEFINE_float("llm_requests_per_s", 5.0, "llm: request rate limit.")
_DEPRESSION = flags.DEFINE_float("depression_deg", 17.0,
                                 "mstar: the collection's depression angle in degrees (17: the "
                                 "training collection, 15: the SOC test collection); sets the "
                                 "chips' incidence (90 - depression) and the config name "
                                 "depression<deg>.")


def make_generator(backend: str, data_dir: str, **llm_options):
  """The text generator of `backend`, from GENERATOR (see there)."""
  try:
    return importlib.import_module(GENERATOR).for_backend(backend, data_dir, **llm_options)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def prepare(dataset: str, data_dir: str, *, generator, **options):
  """Builds (or reuses) a dataset; returns (builder, report). `generator`: the text generator
  (`generate(chip)` for the builders, `check(chip, family, values)` for the report)."""
  try:
    module = importlib.import_module(f"klip.data.builders.{dataset}")
  except ModuleNotFoundError as e:
    raise ValueError(f"unknown dataset {dataset!r}: no module klip.data.builders.{dataset}") from e
  builder = module.builder(data_dir, generator=generator, **options)
  start = time.time()
  builder.download_and_prepare()
  skipped = [(s.path, s.reason) for s in getattr(builder, "skipped", ())]
  report = report_lib.build_report(builder, time.time() - start, check=generator.check,
                                   skipped=skipped)
  report_lib.write(report)
  return builder, report


def main(argv):
  del argv
  if _DEPRESSION.present and _DATASET.value != "mstar":  # before the slow imports
    raise app.UsageError(f"--depression_deg is an mstar option (the collection's depression "
                         f"angle); --dataset={_DATASET.value} has none")
  if not 0.0 < _DEPRESSION.value < 90.0:
    raise app.UsageError(f"--depression_deg must lie in (0, 90), got {_DEPRESSION.value}")
  gen = make_generator(_BACKEND.value, _DATA_DIR.value, base_url=_LLM_URL.value,
                       model=_LLM_MODEL.value, cache_dir=_LLM_CACHE.value,
                       api_key_env=_LLM_KEY_ENV.value, max_requests_per_s=_LLM_RATE.value)
  if _DATASET.value == "synthetic":
    options = dict(num_chips=_NUM_CHIPS.value, image_size=_IMAGE_SIZE.value,
                   channels=_CHANNELS.value, seed=_SEED.value, workers=_WORKERS.value)
  else:
    if not _SOURCE.value:
      raise app.UsageError(f"--dataset={_DATASET.value} needs --source (the archive folder "
                           "or manifest file)")
    options = dict(source=_SOURCE.value, workers=_WORKERS.value)
    if _DATASET.value == "mstar":
      options["depression_deg"] = _DEPRESSION.value
  from klip.data.builders import archive  # pylint: disable=g-import-not-at-top
  try:
    builder, report = prepare(_DATASET.value, _DATA_DIR.value, generator=gen, **options)
  except (archive.NothingToBuild, archive.SourceMismatch) as e:
    sys.exit(f"prepare: {e}")
  print(report_lib.to_markdown(report))
  print(f"report: {os.path.join(report['path'], 'build_report.md')}")
  print(f"dataset: {builder.name}/{builder.builder_config.name}")


if __name__ == "__main__":
  app.run(main)
