"""MSTAR public targets: X-band spotlight chips of ten vehicle classes, one folder per class.

    python -m klip.data.prepare --dataset=mstar --source=../shared/data/mstar/train

Layout: `<CLASS>/<chip id>.jpeg`, 8-bit magnitude chips of one target each, centred. Imaging
facts of the public release: Sandia X-band SAR, spotlight, HH, 0.3047 m pixel spacing; the
depression angle is given by the collection (17 deg for the training set here, so incidence
= 90 - 17 = 73 deg on flat ground); `builder(depression_deg=15)` for the 15 deg test set.

Intensity: the JPEGs are display-scaled magnitude, not calibrated, so dB is relative:
20 log10(magnitude) - 35, which maps magnitude 1..255 onto -35..+13.1 dB, inside the schema's
-35..15 dB range (magnitude 0 is floored to 1).

Splits: chip ids number the acquisitions of one target serial in collection order, i.e. a sweep
in aspect angle; neighbouring ids are near-identical views. Splitting on chip ids would leak
them across splits, and splitting on class would remove classes from training. So each class's
chips, sorted by id number, are cut into blocks of BLOCK consecutive acquisitions (about a
40 deg aspect sector) and a block is the scene of `splits.assign`, run per class: every class
keeps most of its blocks in train and gives whole aspect sectors to val and test.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Container, Iterator

import numpy as np
import tensorflow_datasets as tfds

from klip.data import chip as chip_lib
from klip.data import splits
from klip.data.builders import archive
from klip.data.builders import sources

VERSION = "1.0.0"
BLOCK = 30
PIXEL_SPACING_M = 0.3047
_IMAGE = re.compile(r"[A-Za-z]*(\d+)\.(jpe?g|png|tiff?)", re.I)
# Published hull length x width in metres (gun or blade excluded); the box is the length square
# around the chip centre, since the target's aspect angle is not in the JPEG.
DIMENSIONS_M = {"2S1": (7.26, 2.85), "BMP2": (6.72, 3.15), "BRDM_2": (5.75, 2.37),
                "BTR60": (7.56, 2.83), "BTR70": (7.54, 2.80), "D7": (6.45, 3.71),
                "T62": (6.63, 3.52), "T72": (6.86, 3.59), "ZIL131": (7.04, 2.50),
                "ZSU_23_4": (6.54, 3.13)}
SITE = (34.68, -86.65)  # Redstone Arsenal, Huntsville, Alabama: where the targets were imaged
_SITE_FALLBACK = ("Redstone Arsenal", "river valley", "military test range")


def magnitude_to_db(magnitude: np.ndarray) -> np.ndarray:
  """Relative dB of 8-bit magnitude: 20 log10(max(m, 1)) - 35."""
  return (20.0 * np.log10(np.maximum(magnitude, 1.0)) - 35.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Task:
  path: str
  cls: str
  chip_id: str
  scene_id: str
  incidence_deg: float


def _tasks(source: str, depression_deg: float) -> Iterator[_Task | sources.Skipped]:
  """Every chip file with its scene (class + block of consecutive acquisitions)."""
  for cls in sorted(os.listdir(source)):
    folder = os.path.join(source, cls)
    if not os.path.isdir(folder):
      continue
    numbered = []
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      m = _IMAGE.fullmatch(name)
      try:
        if cls not in DIMENSIONS_M:
          raise sources.SkipError(f"unknown MSTAR class folder {cls!r}; known: "
                                  f"{sorted(DIMENSIONS_M)}")
        if not m:
          raise sources.SkipError("file name is not an MSTAR chip id with an image extension")
        numbered.append((int(m[1]), name, sources.inside(source, path)))
      except sources.SkipError as e:
        yield sources.Skipped(path, str(e))
    numbered.sort()
    for i, (_, name, path) in enumerate(numbered):
      block = numbered[i - i % BLOCK: i - i % BLOCK + BLOCK]
      yield _Task(path=path, cls=cls, chip_id=f"{cls}_{os.path.splitext(name)[0]}",
                  scene_id=f"{cls}_{block[0][0]}-{block[-1][0]}",
                  incidence_deg=90.0 - depression_deg)


def _load(task: _Task) -> chip_lib.Chip | sources.Skipped:
  try:
    pixels = sources.read_image(task.path)
    if pixels.shape[-1] in (3, 4):  # a grey chip saved as RGB(A)
      pixels = pixels[..., :1]
    image = sources.check_pixels(pixels, 1)
  except sources.SkipError as e:
    return sources.Skipped(task.path, str(e))
  h, w = image.shape[:2]
  length, width = DIMENSIONS_M[task.cls]
  half = 0.5 * length / PIXEL_SPACING_M
  box = (max(w / 2 - half, 0.0), max(h / 2 - half, 0.0), min(w / 2 + half, float(w)),
         min(h / 2 + half, float(h)))
  return chip_lib.Chip(
      id=task.chip_id, scene_id=task.scene_id, image_db=magnitude_to_db(image),
      imaging=chip_lib.Imaging(
          platform="MSTAR (Sandia X-band SAR)", band="X", mode="spotlight",
          polarisations=("HH",), pixel_spacing_m=PIXEL_SPACING_M,
          incidence_deg=task.incidence_deg, orbit_direction="airborne"),
      geo=sources.place(*SITE, _SITE_FALLBACK), family="target",
      instances=(chip_lib.Instance("vehicle", box, subtype=task.cls, length_m=length,
                                   width_m=width, speed_kn=0.0),), count=1)


def split_of(source: str, val_fraction: float, test_fraction: float,
             depression_deg: float = 17.0, unreadable: Container[str] = ()) -> dict[str, str]:
  """Scene (class block) -> split, assigned per class so no class leaves train; the
  `unreadable` scenes get none."""
  by_class: dict[str, set[str]] = {}
  for t in _tasks(source, depression_deg):
    if isinstance(t, _Task) and t.scene_id not in unreadable:
      by_class.setdefault(t.cls, set()).add(t.scene_id)
  out = {}
  for scenes in by_class.values():
    out.update(splits.assign(scenes, val_fraction, test_fraction))
  return out


def chips(source: str, *, depression_deg: float = 17.0, scenes: Container[str] | None = None,
          workers: int = 1) -> Iterator[chip_lib.Chip | sources.Skipped]:
  """Every chip of the class folders as a Chip, or Skipped with its reason (stable order).

  scenes: only these scene ids (all when None); workers: image-decoding processes.
  """
  items = [t for t in _tasks(source, depression_deg)
           if not isinstance(t, _Task) or scenes is None or t.scene_id in scenes]
  return sources.load_all(items, _Task, _load, workers)


@dataclasses.dataclass
class MstarConfig(archive.ArchiveConfig):
  depression_deg: float = 17.0


class Mstar(archive.ArchiveBuilder):
  """MSTAR public target chips (X-band, 0.3 m, HH, relative dB); splits by aspect block."""

  VERSION = tfds.core.Version(VERSION)

  def _split_assignment(self, unreadable: frozenset[str]) -> dict[str, str]:
    cfg = self.builder_config
    return split_of(cfg.source, cfg.val_fraction, cfg.test_fraction, cfg.depression_deg,
                    unreadable=unreadable)

  def _chips(self, scenes, workers: int):
    cfg = self.builder_config
    return chips(cfg.source, depression_deg=cfg.depression_deg, scenes=scenes, workers=workers)


def builder(data_dir: str, *, source: str, generator, workers: int = 0,
            val_fraction: float = 0.1, test_fraction: float = 0.1,
            depression_deg: float = 17.0) -> Mstar:
  cfg = MstarConfig(name=f"depression{depression_deg:g}", source=os.path.abspath(source),
                    workers=workers, val_fraction=val_fraction, test_fraction=test_fraction,
                    depression_deg=depression_deg)
  return archive.make(Mstar, data_dir, cfg, generator)
