"""The TFDS builder shared by the real-archive datasets (opensarship, mstar, manifest).

A dataset module subclasses `ArchiveBuilder` and gives it its module's `scene_ids(source)` (cheap:
no pixels are decoded) and `chips(source, scenes=, workers=)` (the chips of those scenes
interleaved with `Skipped` records) as `scene_ids_of` and `chips_of`; a dataset with another
split rule overrides `_split_assignment()` and `_chips(scenes)`. Each chip's
text comes from the HCoT generator passed in by `prepare`.

Skipped records: filled into `builder.skipped` while the dataset is generated and written to
`skipped.json` beside `dataset_info.json`, so a second run that reuses the prepared dataset still
reports them (`builder.skipped` then reads the file).
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow_datasets as tfds

from klip.data import schema
from klip.data import splits
from klip.data.builders import sources

SKIPPED_FILE = "skipped.json"


@dataclasses.dataclass
class ArchiveConfig(tfds.core.BuilderConfig):
  source: str = ""
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  workers: int = 0  # image-decoding processes; 0: all cores, 1: in process


class ArchiveBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Chips of a real archive with HCoT text, written in the KLIP record schema."""

  def __init__(self, *, generator, **kwargs):
    self._generator = generator
    self._skipped: dict[tuple[str, str], sources.Skipped] | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=schema.FEATURES,
                                 description=type(self).__doc__, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    self._skipped = {}
    split_of = self._split_assignment()
    return {s: self._generate_examples(split_of, s) for s in splits.SPLITS
            if s in split_of.values()}

  def _split_assignment(self) -> dict[str, str]:
    """Scene id -> split over the archive's scenes (`scene_ids_of(source)`)."""
    cfg = self.builder_config
    return splits.assign(self.scene_ids_of(cfg.source), cfg.val_fraction, cfg.test_fraction)

  def _chips(self, scenes):
    """The chips of `scenes` (`chips_of(source, scenes=, workers=)`), with Skipped records."""
    cfg = self.builder_config
    return self.chips_of(cfg.source, scenes=scenes, workers=cfg.workers)

  def _generate_examples(self, split_of: dict[str, str], split: str):
    scenes = {scene for scene, s in split_of.items() if s == split}
    for item in self._chips(scenes):
      if isinstance(item, sources.Skipped):
        self._skipped[(item.path, item.reason)] = item
        continue
      result = self._generator.generate(item)
      yield item.id, schema.to_record(item, result.text, split, uncertain=result.uncertain,
                                      generic=result.generic, repairs=result.repairs)

  def download_and_prepare(self, *args, **kwargs):
    super().download_and_prepare(*args, **kwargs)
    if self._skipped is not None:  # generated in this call, not reused
      with open(os.path.join(self.data_dir, SKIPPED_FILE), "w") as f:
        json.dump([dataclasses.asdict(s) for s in self._skipped.values()], f, indent=1)

  @property
  def skipped(self) -> list[sources.Skipped]:
    """What the build skipped, with reasons (from this run, or from skipped.json)."""
    if self._skipped is not None:
      return list(self._skipped.values())
    with open(os.path.join(self.data_dir, SKIPPED_FILE)) as f:
      return [sources.Skipped(**s) for s in json.load(f)]


def make(cls: type[ArchiveBuilder], data_dir: str, cfg: ArchiveConfig,
         generator) -> ArchiveBuilder:
  """An archive builder of `cls` with config `cfg`, writing ArrayRecord under `data_dir`."""
  if not os.path.exists(cfg.source):
    raise FileNotFoundError(f"{cls.name}: source {cfg.source!r} does not exist")
  if generator.backend.name != "rules":  # other texts: another dataset
    cfg = dataclasses.replace(cfg, name=f"{cfg.name}_{generator.backend.name}")
  return cls(data_dir=data_dir, config=cfg, generator=generator, file_format="array_record")
