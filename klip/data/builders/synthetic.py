"""The embedded default corpus: simulated SAR chips with their structured text.

    python -m klip.data.prepare --dataset=synthetic --data_dir=data --num_chips=4000
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds

from klip.data import schema
from klip.data import simulator
from klip.data import splits
from klip.data import template_writer

VERSION = "1.0.0"


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  num_chips: int = 1000
  image_size: int = 64
  channels: int = 2
  seed: int = 0
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  workers: int = 0  # 0: all cores


def config_name(num_chips: int, image_size: int, channels: int, seed: int) -> str:
  return f"n{num_chips}_s{image_size}_c{channels}_seed{seed}"


def config_options(name: str) -> dict[str, int]:
  """Inverse of config_name: the prepare options that build config `name`."""
  m = re.fullmatch(r"n(\d+)_s(\d+)_c(\d+)_seed(\d+)", name)
  if not m:
    raise ValueError(f"not a synthetic config name: {name!r} (expected n<N>_s<S>_c<C>_seed<K>)")
  return dict(zip(("num_chips", "image_size", "channels", "seed"), map(int, m.groups())))


class Synthetic(tfds.core.GeneratorBasedBuilder):
  """Simulated SAR chips; splits by city (the simulator's scene)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = []

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=schema.FEATURES,
                                 description=__doc__, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    cities = [simulator.scene_city(i, cfg.seed).name for i in range(cfg.num_chips)]
    split_of = splits.assign(cities, cfg.val_fraction, cfg.test_fraction)
    members = {s: [i for i, c in enumerate(cities) if split_of[c] == s] for s in splits.SPLITS}
    return {s: self._generate_examples(idx, s) for s, idx in members.items() if idx}

  def _generate_examples(self, indices, split):
    cfg = self.builder_config
    workers = cfg.workers or os.cpu_count()
    for chip in simulator.simulate(indices, cfg.seed, cfg.image_size, cfg.channels, workers):
      yield chip.id, schema.to_record(chip, template_writer.caption(chip), split)


def builder(data_dir: str, *, num_chips: int = 1000, image_size: int = 64, channels: int = 2,
            seed: int = 0, workers: int = 0) -> Synthetic:
  cfg = SyntheticConfig(name=config_name(num_chips, image_size, channels, seed),
                        num_chips=num_chips, image_size=image_size, channels=channels,
                        seed=seed, workers=workers)
  return Synthetic(data_dir=data_dir, config=cfg, file_format="array_record")
