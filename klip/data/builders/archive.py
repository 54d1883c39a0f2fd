"""The TFDS builder shared by the real-archive datasets (opensarship, mstar, manifest).

A dataset module subclasses `ArchiveBuilder` and gives it its module's `scene_ids(source)` (cheap:
no pixels are decoded) and `chips(source, scenes=, workers=)` (the chips of those scenes
interleaved with `Skipped` records) as `scene_ids_of` and `chips_of`; a dataset with another
split rule overrides `_split_assignment(unreadable)` and `_chips(scenes, workers)`. Each chip's
text comes from the HCoT generator passed in by `prepare`.

Splits are assigned from scene ids before pixels are decoded, and TFDS cannot write a split with
no examples. So before writing, each split is probed in this process for one chip that decodes
(one decode per split when the data is sound); the scenes of a split with none are unreadable
(every chip of them was tried), are recorded as skipped and left out, and the splits are assigned
again over the rest. A source with no readable chip at all raises `NothingToBuild`.

Skipped records: filled into `builder.skipped` while the dataset is generated and written to
`skipped.json` beside `dataset_info.json`, so a second run that reuses the prepared dataset still
reports them (`builder.skipped` then reads the file).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os

import tensorflow_datasets as tfds

from klip.data import schema
from klip.data import splits
from klip.data.builders import sources

SKIPPED_FILE = "skipped.json"
SOURCE_FILE = "source.json"  # the source a dataset was built from, beside dataset_info.json
UNREADABLE_SCENE = "no chip of this scene could be read; the scene is left out of the splits"


class NothingToBuild(ValueError):
  """The source has no usable chip: every record was skipped (the message lists why)."""


class SourceMismatch(ValueError):
  """The dataset directory holds a dataset built from another source."""


@dataclasses.dataclass
class ArchiveConfig(tfds.core.BuilderConfig):
  source: str = ""
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  workers: int = 0  # image-decoding processes; 0: all cores, 1: in process


class ArchiveBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Chips of a real archive with HCoT text, written in the KLIP record schema."""

  # Whether the config name already tells sources apart (the manifest's content hash): then a
  # moved copy of the same source reuses its dataset; else the recorded source must match.
  NAMED_BY_CONTENT = False

  def __init__(self, *, generator, **kwargs):
    self._generator = generator
    self._skipped: dict[tuple[str, str], sources.Skipped] | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=schema.FEATURES,
                                 description=type(self).__doc__, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    self._skipped = {}
    split_of = self._readable_split_assignment()
    return {s: self._generate_examples(split_of, s) for s in splits.SPLITS
            if s in split_of.values()}

  def _split_assignment(self, unreadable: frozenset[str]) -> dict[str, str]:
    """Scene id -> split over the archive's scenes (`scene_ids_of(source)`) but `unreadable`."""
    cfg = self.builder_config
    return splits.assign(set(self.scene_ids_of(cfg.source)) - unreadable, cfg.val_fraction,
                         cfg.test_fraction)

  def _chips(self, scenes, workers: int):
    """The chips of `scenes` (`chips_of(source, scenes=, workers=)`), with Skipped records."""
    return self.chips_of(self.builder_config.source, scenes=scenes, workers=workers)

  def _readable_split_assignment(self) -> dict[str, str]:
    """The split assignment in which every split has a chip that decodes (module docstring)."""
    unreadable: set[str] = set()
    while True:
      split_of = self._split_assignment(frozenset(unreadable))
      if not split_of:
        for item in self._chips(set(), workers=1):  # the records skipped before any decode
          if isinstance(item, sources.Skipped):
            self._skip(item)
        raise NothingToBuild(self._nothing_to_build())
      dead = set()
      for split in splits.SPLITS:
        scenes = {scene for scene, s in split_of.items() if s == split}
        if scenes and not self._has_readable_chip(scenes):
          dead |= scenes
      if not dead:
        return split_of
      for scene in sorted(dead):
        self._skip(sources.Skipped(f"scene {scene}", UNREADABLE_SCENE))
      unreadable |= dead

  def _has_readable_chip(self, scenes) -> bool:
    """Whether a chip of `scenes` decodes; tries them in order, recording what is skipped."""
    with contextlib.closing(iter(self._chips(scenes, workers=1))) as items:
      for item in items:
        if not isinstance(item, sources.Skipped):
          return True
        self._skip(item)
    return False

  def _skip(self, item: sources.Skipped):
    self._skipped[(item.path, item.reason)] = item

  def _nothing_to_build(self) -> str:
    skipped = list(self._skipped.values())
    reasons = collections.Counter(s.reason.split(":")[0] for s in skipped)
    lines = [f"  {n} x {reason}" for reason, n in reasons.most_common(5)]
    lines += [f"  e.g. {s.path}: {s.reason}" for s in skipped[:3]]
    return (f"{self.name}: nothing to build from {self.builder_config.source}: "
            f"{'no records' if not skipped else f'all {len(skipped)} records were skipped'}"
            + "".join("\n" + line for line in lines))

  def _generate_examples(self, split_of: dict[str, str], split: str):
    scenes = {scene for scene, s in split_of.items() if s == split}
    for item in self._chips(scenes, workers=self.builder_config.workers):
      if isinstance(item, sources.Skipped):
        self._skip(item)
        continue
      result = self._generator.generate(item)
      yield item.id, schema.to_record(item, result.text, split, uncertain=result.uncertain,
                                      generic=result.generic, repairs=result.repairs)

  def download_and_prepare(self, *args, **kwargs):
    self._check_source()
    super().download_and_prepare(*args, **kwargs)
    if self._skipped is not None:  # generated in this call, not reused
      with open(os.path.join(self.data_dir, SKIPPED_FILE), "w") as f:
        json.dump([dataclasses.asdict(s) for s in self._skipped.values()], f, indent=1)
      with open(os.path.join(self.data_dir, SOURCE_FILE), "w") as f:
        json.dump({"source": self.builder_config.source}, f)

  def _check_source(self) -> None:
    """Refuses to reuse a dataset prepared here from another source folder (TFDS would reuse
    it by name alone and write nothing)."""
    path = os.path.join(self.data_dir, SOURCE_FILE)
    if self.NAMED_BY_CONTENT or not os.path.exists(path):
      return
    with open(path) as f:
      built_from = json.load(f)["source"]
    if built_from != self.builder_config.source:
      raise SourceMismatch(
          f"{self.data_dir} holds {self.name}/{self.builder_config.name} built from "
          f"{built_from}, not {self.builder_config.source}: use another --data_dir, or delete "
          "that directory to rebuild it from the new source")

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
