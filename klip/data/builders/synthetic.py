"""The embedded default corpus: simulated SAR chips with their HCoT structured text.

    python -m klip.data.prepare --dataset=synthetic --data_dir=data --num_chips=4000

Texts come from the HCoT generator (`klip.hcot`) over the simulator's exact ground truth, with
the `rules` backend unless another is named.
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds

from klip.data import schema
from klip.data import simulator
from klip.data import splits

VERSION = "1.3.0"  # 1.1.0: instance subtypes and attributes; 1.2.0: HCoT text;
# 1.3.0: only visible targets placed and reported (simulator_targets.MIN_SCR_DB, MIN_TARGET_PX)


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  num_chips: int = 1000
  image_size: int = 64
  channels: int = 2
  seed: int = 0
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  workers: int = 0  # 0: all cores


def config_name(num_chips: int, image_size: int, channels: int, seed: int,
                backend: str = "rules") -> str:
  """The config name; a backend other than rules is appended, as its texts differ."""
  suffix = "" if backend == "rules" else f"_{backend}"
  return f"n{num_chips}_s{image_size}_c{channels}_seed{seed}{suffix}"


def config_options(name: str) -> dict[str, int | str]:
  """Inverse of config_name: the prepare options that build config `name`."""
  m = re.fullmatch(r"n(\d+)_s(\d+)_c(\d+)_seed(\d+)(?:_([a-z]+))?", name)
  if not m:
    raise ValueError(f"not a synthetic config name: {name!r} "
                     "(expected n<N>_s<S>_c<C>_seed<K>[_<backend>])")
  options = dict(zip(("num_chips", "image_size", "channels", "seed"), map(int, m.groups()[:4])))
  return options if m.group(5) is None else {**options, "backend": m.group(5)}


class Synthetic(tfds.core.GeneratorBasedBuilder):
  """Simulated SAR chips; splits by city (the simulator's scene)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = []

  def __init__(self, *, generator, **kwargs):
    self._generator = generator
    super().__init__(**kwargs)

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
      result = self._generator.generate(chip)
      yield chip.id, schema.to_record(chip, result.text, split, uncertain=result.uncertain,
                                      generic=result.generic, repairs=result.repairs)


def builder(data_dir: str, *, generator, num_chips: int = 1000, image_size: int = 64,
            channels: int = 2, seed: int = 0, workers: int = 0) -> Synthetic:
  backend = generator.backend.name
  cfg = SyntheticConfig(name=config_name(num_chips, image_size, channels, seed, backend),
                        num_chips=num_chips, image_size=image_size, channels=channels,
                        seed=seed, workers=workers)
  return Synthetic(data_dir=data_dir, config=cfg, generator=generator,
                   file_format="array_record")
