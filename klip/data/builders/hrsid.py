"""HRSID: high-resolution ship scenes of 800 x 800 pixels with per-ship instance masks.

    python -m klip.data.prepare --dataset=hrsid --source=../shared/data/hrsid_samples

Layout: `<crop>.png`, the 8-bit grey amplitude image (stored as RGB with equal channels), and
`<crop>_instance_id_RGB.png`, its instance mask: one colour per ship, black background
(`<crop>_instance_color_RGB.png`, the semantic mask, is not needed). A crop is named
`P<panorama>_<a>_<b>_<c>_<d>`: HRSID cut 136 panoramas into overlapping 800 px crops, so crops of
one panorama share pixels and the panorama is the scene that splits are made on.

One record per crop, the full 800 x 800 scene (evaluators tile it): `family="target"`, one
`Instance("ship", box)` per distinct non-black colour of the mask, the box tightly enclosing
that colour's pixels (x1, y1 exclusive); colours covering fewer than MIN_PIXELS pixels are
annotation specks and dropped (the smallest ship of the samples covers 67 px). `count` is the
number of ships kept.

Intensity: the PNGs are display-scaled amplitude, not calibrated, so dB is relative:
20 log10(amplitude) - 47, which puts typical sea clutter (amplitude ~24) near -20 dB and
amplitude 255 at +1.1 dB; amplitudes 0-3 fall below the schema's -35 dB floor and clip there.

What the archive does not say, and what the records hold instead (documented, not measured):
- sensor: HRSID mixes Sentinel-1B (C-band) with TerraSAR-X and TanDEM-X (X-band) and does not
  say which panorama came from which; platform "HRSID (Sentinel-1B, TerraSAR-X or TanDEM-X)",
  band "X" (two of the three sensors), mode and orbit direction "unknown";
- polarisation: not recorded; the one channel is named "HH" (single co-pol);
- pixel spacing: 0.5-3 m across HRSID; nominal PIXEL_SPACING_M = 1 m, so text sizes are
  approximate; incidence: nominal INCIDENCE_DEG = 35 deg (mid-range of those sensors);
- location: unknown. Records store city/country "unknown" and lat/lon NaN. The HCoT generator
  needs coordinates, so it is run with a stand-in location and the two fields it derives from
  the location (PLACE_FIELDS: region, environment) are replaced by the generic value and listed
  in `text_generic`.

Splits by panorama (`split_of`): `splits.assign` order (a hash of the id), with at least one
test panorama when there are two or more and one val panorama when there are three or more,
so the four sample scenes give 2 train, 1 val, 1 test.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Container, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from klip.data import caption as caption_lib
from klip.data import chip as chip_lib
from klip.data import splits
from klip.data import text as text_lib
from klip.data.builders import archive
from klip.data.builders import sources

VERSION = "1.0.0"
MIN_PIXELS = 16
DB_OFFSET = 47.0
PIXEL_SPACING_M = 1.0
INCIDENCE_DEG = 35.0
MASK_SUFFIX = "_instance_id_RGB.png"
SEMANTIC_SUFFIX = "_instance_color_RGB.png"
IMAGING = chip_lib.Imaging(
    platform="HRSID (Sentinel-1B, TerraSAR-X or TanDEM-X)", band="X", mode="unknown",
    polarisations=("HH",), pixel_spacing_m=PIXEL_SPACING_M, incidence_deg=INCIDENCE_DEG,
    orbit_direction="unknown")
NO_PLACE = chip_lib.Geo("unknown", "unknown", math.nan, math.nan, "unknown", "unknown", "unknown")
PLACE_FIELDS = ("region", "environment")
_STAND_IN_PLACE = dataclasses.replace(NO_PLACE, lat=0.0, lon=0.0)
_CROP = re.compile(r"(P\d+)_\d+_\d+_\d+_\d+")


def amplitude_to_db(amplitude: np.ndarray) -> np.ndarray:
  """Relative dB of 8-bit amplitude: 20 log10(max(a, 1)) - DB_OFFSET."""
  return (20.0 * np.log10(np.maximum(amplitude, 1.0)) - DB_OFFSET).astype(np.float32)


def ship_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
  """(x0, y0, x1, y1) boxes, exclusive ends, of each non-black colour of an RGB(A) instance mask
  [H, W, 3 or 4] (or each non-zero id of a one-channel mask) covering at least MIN_PIXELS
  pixels, in colour order."""
  if mask.shape[-1] not in (1, 3, 4):
    raise sources.SkipError(f"instance mask has {mask.shape[-1]} channels, expected RGB or ids")
  channels = mask[..., :3].astype(np.int64)
  ids = np.zeros(mask.shape[:2], np.int64)
  for c in range(channels.shape[-1]):
    ids = ids * 256 + channels[..., c]
  colours, labels, counts = np.unique(ids, return_inverse=True, return_counts=True)
  slices = ndimage.find_objects(labels.reshape(ids.shape) + 1)
  return [(float(sx.start), float(sy.start), float(sx.stop), float(sy.stop))
          for colour, n, (sy, sx) in zip(colours, counts, slices)
          if colour != 0 and n >= MIN_PIXELS]


@dataclasses.dataclass(frozen=True)
class _Task:
  image: str
  mask: str
  chip_id: str
  scene_id: str


def _tasks(source: str) -> Iterator[_Task | sources.Skipped]:
  """Every crop image of the folder with its mask, or why it cannot be used."""
  for name in sorted(os.listdir(source)):
    stem, ext = os.path.splitext(name)
    if ext.lower() != ".png" or name.endswith((MASK_SUFFIX, SEMANTIC_SUFFIX)):
      continue
    path = os.path.join(source, name)
    try:
      crop = _CROP.fullmatch(stem)
      if not crop:
        raise sources.SkipError("file name is not an HRSID crop name P<panorama>_<a>_<b>_<c>_<d>"
                                " (the panorama is the split key)")
      image = sources.inside(source, name)
      try:
        mask = sources.inside(source, stem + MASK_SUFFIX)
      except sources.SkipError as e:
        raise sources.SkipError(f"instance mask: {e}") from None
      yield _Task(image=image, mask=mask, chip_id=stem, scene_id=crop[1])
    except sources.SkipError as e:
      yield sources.Skipped(path, str(e))


def _grey(pixels: np.ndarray) -> np.ndarray:
  """[H, W, 1] amplitude of an 8-bit grey image, also when saved as RGB(A) with equal channels."""
  if pixels.dtype != np.uint8:
    raise sources.SkipError(f"image is {pixels.dtype}, expected 8-bit amplitude")
  if pixels.shape[-1] in (3, 4):
    if np.any(pixels[..., :3] != pixels[..., :1]):
      raise sources.SkipError("RGB image whose channels differ: expected grey SAR amplitude")
    pixels = pixels[..., :1]
  return sources.check_pixels(pixels.astype(np.float32), 1)


def _load(task: _Task) -> chip_lib.Chip | sources.Skipped:
  try:
    image_db = amplitude_to_db(_grey(sources.read_pixels(task.image)))
  except sources.SkipError as e:
    return sources.Skipped(task.image, str(e))
  try:
    mask = sources.read_pixels(task.mask)
    if mask.shape[:2] != image_db.shape[:2]:
      raise sources.SkipError(f"instance mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                              f"{image_db.shape[1]}x{image_db.shape[0]}")
    boxes = ship_boxes(mask)
  except sources.SkipError as e:
    return sources.Skipped(task.mask, str(e))
  return chip_lib.Chip(
      id=task.chip_id, scene_id=task.scene_id, image_db=image_db, imaging=IMAGING,
      geo=NO_PLACE, family="target",
      instances=tuple(chip_lib.Instance("ship", box) for box in boxes), count=len(boxes))


def chips(source: str, *, scenes: Container[str] | None = None, workers: int = 1
          ) -> Iterator[chip_lib.Chip | sources.Skipped]:
  """Every crop as a Chip, or Skipped with the file and reason (stable order).

  scenes: only these panoramas (all when None); workers: image-decoding processes.
  """
  items = [t for t in _tasks(source)
           if not isinstance(t, _Task) or scenes is None or t.scene_id in scenes]
  return sources.load_all(items, _Task, _load, workers)


def split_of(panoramas: Iterable[str], val_fraction: float, test_fraction: float
             ) -> dict[str, str]:
  """Panorama -> split: `splits.assign`, with at least one test panorama when there are two or
  more and at least one val panorama when there are three or more."""
  scenes = set(panoramas)
  n = len(scenes)
  if not n:
    return {}
  n_test = max(round(test_fraction * n), int(n >= 2))
  n_val = max(round(val_fraction * n), int(n >= 3))
  return splits.assign(scenes, n_val / n, n_test / n)


class _NoPlaceText:
  """The HCoT generator for chips of unknown location: it runs with a stand-in location and the
  fields derived from the location (PLACE_FIELDS) become the generic value, listed as generic."""

  def __init__(self, generator):
    self._generator = generator
    self.backend = generator.backend

  def generate(self, chip: chip_lib.Chip):
    result = self._generator.generate(dataclasses.replace(chip, geo=_STAND_IN_PLACE))
    values = [caption_lib.GENERIC if name in PLACE_FIELDS else value
              for name, value in zip(chip.field_names, result.text.values)]
    return dataclasses.replace(
        result, text=text_lib.compose(chip.family, values),
        generic=tuple(dict.fromkeys(result.generic + PLACE_FIELDS)),
        uncertain=tuple(f for f in result.uncertain if f not in PLACE_FIELDS))


class Hrsid(archive.ArchiveBuilder):
  """HRSID ship scenes (800 px, relative dB, ship boxes from instance masks); splits by
  panorama."""

  VERSION = tfds.core.Version(VERSION)
  chips_of = staticmethod(chips)

  def _split_assignment(self, unreadable: frozenset[str]) -> dict[str, str]:
    """Splits over the panoramas of the crops that load: every crop is decoded here (a few
    large scenes), so the probe of `archive` finds every split readable."""
    cfg = self.builder_config
    panoramas = set()
    for item in chips(cfg.source, workers=cfg.workers):
      if isinstance(item, sources.Skipped):
        self._skip(item)
      else:
        panoramas.add(item.scene_id)
    return split_of(panoramas - unreadable, cfg.val_fraction, cfg.test_fraction)


def builder(data_dir: str, *, source: str, generator, workers: int = 0,
            val_fraction: float = 0.1, test_fraction: float = 0.1) -> Hrsid:
  """`source`: the folder of crops and their `*_instance_id_RGB.png` masks."""
  cfg = archive.ArchiveConfig(name="default", source=os.path.abspath(source), workers=workers,
                              val_fraction=val_fraction, test_fraction=test_fraction)
  return archive.make(Hrsid, data_dir, cfg, _NoPlaceText(generator))
