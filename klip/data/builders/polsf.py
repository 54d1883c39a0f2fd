"""PolSF: the AIRSAR L-band quad-pol scene of San Francisco with a per-pixel land-cover label map.

    python -m klip.data.prepare --dataset=polsf --source=../shared/data/polsf

Layout: `SF-AIRSAR-Pauli.bmp` (8-bit Pauli RGB composite, R = |HH-VV|, G = |HV|,
B = |HH+VV|, 900 x 1024) and `SF-AIRSAR-label2d.png` (label values 0-5, same size). The other
PolSF sensors (ALOS-2, GF-3, RISAT, RADARSAT-2) use other label codes and are not read.

Labels -> `chip.LANDCOVER_CLASSES` (LABEL_CLASSES), 0 (unlabelled) -> IGNORE = 255:
  1 bare_soil (the Ocean Beach strip), 2 mountain (the Marin Headlands), 3 water (the Golden
  Gate, the bay and the Pacific), 4 urban (the city grid), 5 vegetation (Golden Gate Park, the
  Presidio). The archive's SOURCE_README lists the AIRSAR classes as 1 Mountain, 2 Water,
  3 Urban, 4 Vegetation, 5 Bare soil, shifted by one against the data: its "Urban" (3) covers
  the sea and its "Water" (2) the headlands. The mapping here follows the data, and
  `check_classes` verifies it on the image (the water class is the one dominated by surface
  scattering, the urban class has the strongest double bounce), so a label release that
  renumbers the classes fails with a clear error instead of writing wrong masks.

Image: two channels in relative dB, 20 log10(max(v, 1)) - 47 of the 8-bit display amplitude v
(as for HRSID): channel 0 from B = |HH+VV| (co-polarised surface scattering, named "HH"),
channel 1 from G = |HV| (named "HV"); R (|HH-VV|) is dropped, the schema holds two channels.

Blocks: the scene is cut into a GRID x GRID grid of blocks (2 x 2: 450 x 512 px), one record
each with scene_id = the block, the full block (evaluators tile it); its landcover keeps 255
for unlabelled pixels. The HCoT statistics should count labelled pixels only, but the
generator reads every mask value as a class id, so it is given the block's mask with each
unlabelled pixel set to the class of the nearest labelled pixel (the classes present stay the
same); the record keeps the 255s. A block with no labelled pixel is skipped.

Splits (`split_of`): blocks are spatially disjoint; in `splits.assign` order (a hash of the id)
blocks go to test until round(test_fraction * n) (at least 1), then to val until
round(val_fraction * n) (at least 1 with three or more blocks), passing over a block whose loss
would leave train without a class that covers at least MIN_CLASS_SHARE of some block (so test
or val may get fewer blocks, never a class train lacks). On the archive: test r0c1 (water,
urban, vegetation), val r1c1 (urban), train r0c0 and r1c0 (the only mountain and bare soil).

Geo: San Francisco. The scene centre (CENTRE, north up) was placed from landmarks (Golden Gate
Park spans image x 190-640 at y ~615, the Golden Gate Bridge crosses x ~215), +-0.01 deg; a
block's centre is offset from it at the nominal pixel spacing. Imaging: NASA/JPL AIRSAR,
L-band, quad-pol, 10 m pixel spacing, airborne; incidence 40 deg, a nominal mid-swath value
(the swath spans roughly 10-60 deg).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Container, Iterator

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from klip.data import chip as chip_lib
from klip.data.builders import archive
from klip.data.builders import sources

VERSION = "1.0.0"
SCENE = "SF-AIRSAR"
PAULI = f"{SCENE}-Pauli.bmp"
LABELS = f"{SCENE}-label2d.png"
LABEL_CLASSES = {1: "bare_soil", 2: "mountain", 3: "water", 4: "urban", 5: "vegetation"}
IGNORE = 255
GRID = 2
MIN_CLASS_SHARE = 0.01
DB_OFFSET = 47.0
PIXEL_SPACING_M = 10.0
CENTRE = (37.786, -122.470)
IMAGING = chip_lib.Imaging(platform="NASA/JPL AIRSAR", band="L", mode="quad-pol",
                           polarisations=("HH", "HV"), pixel_spacing_m=PIXEL_SPACING_M,
                           incidence_deg=40.0, orbit_direction="airborne")
_METRES_PER_DEG = 111_320.0


def amplitude_to_db(amplitude: np.ndarray) -> np.ndarray:
  """Relative dB of 8-bit amplitude: 20 log10(max(v, 1)) - DB_OFFSET."""
  return (20.0 * np.log10(np.maximum(amplitude, 1.0)) - DB_OFFSET).astype(np.float32)


def landcover_of(labels: np.ndarray) -> np.ndarray:
  """Class ids of `chip.LANDCOVER_CLASSES` for PolSF-AIRSAR label values; 0 -> IGNORE."""
  lut = np.full(256, IGNORE, np.uint8)
  for value, name in LABEL_CLASSES.items():
    lut[value] = chip_lib.LANDCOVER_CLASSES.index(name)
  return lut[labels]


def check_classes(pauli: np.ndarray, landcover: np.ndarray) -> None:
  """SkipError unless water is the class dominated by surface scattering (median B above its R
  and G) and urban the class with the strongest double bounce (highest median R)."""
  medians = {name: np.median(pauli[landcover == chip_lib.LANDCOVER_CLASSES.index(name)], axis=0)
             for name in LABEL_CLASSES.values()}
  surface = [n for n, (r, g, b) in medians.items() if b > max(r, g)]
  double_bounce = max(medians, key=lambda n: medians[n][0])
  if surface != ["water"] or double_bounce != "urban":
    raise sources.SkipError(
        f"label values do not match the Pauli image: surface-dominated classes {surface} "
        f"(expected ['water']), strongest double bounce {double_bounce!r} (expected 'urban'); "
        f"the label map numbers its classes differently from {LABEL_CLASSES}")


def _read(source: str, name: str, channels: int) -> np.ndarray:
  """8-bit pixels [H, W, channels] of file `name`; SkipError naming the file otherwise."""
  try:
    pixels = sources.read_pixels(sources.inside(source, name))
    if pixels.dtype != np.uint8 or pixels.shape[-1] != channels:
      raise sources.SkipError(f"expected 8-bit pixels with {channels} channels, got "
                              f"{pixels.dtype} with {pixels.shape[-1]}")
  except sources.SkipError as e:
    raise sources.SkipError(f"{os.path.join(source, name)}: {e}") from None
  return pixels


def read_scene(source: str) -> tuple[np.ndarray, np.ndarray]:
  """(image_db [H, W, 2], landcover [H, W] uint8 with IGNORE) of the scene; SkipError naming the
  file when one is missing, unreadable or inconsistent."""
  pauli = _read(source, PAULI, 3)
  labels = _read(source, LABELS, 1)[..., 0]
  where = os.path.join(source, LABELS)
  if labels.shape != pauli.shape[:2]:
    raise sources.SkipError(f"{where}: label map is {labels.shape[1]}x{labels.shape[0]}, the "
                            f"Pauli image {pauli.shape[1]}x{pauli.shape[0]}")
  unknown = sorted(set(np.unique(labels).tolist()) - set(LABEL_CLASSES) - {0})
  if unknown:
    raise sources.SkipError(f"{where}: label values {unknown} are not PolSF-AIRSAR classes "
                            f"(0 and {sorted(LABEL_CLASSES)})")
  landcover = landcover_of(labels)
  try:
    check_classes(pauli, landcover)
  except sources.SkipError as e:
    raise sources.SkipError(f"{where}: {e}") from None
  image_db = amplitude_to_db(pauli[..., [2, 1]].astype(np.float32))  # B = |HH+VV|, G = |HV|
  return sources.check_pixels(image_db, 2), landcover


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of the scene grid: its id (the record and scene id) and pixel ranges."""
  id: str
  rows: slice
  cols: slice


def blocks(height: int, width: int) -> list[Block]:
  """The GRID x GRID blocks of the scene, row-major."""
  ys = np.linspace(0, height, GRID + 1).astype(int)
  xs = np.linspace(0, width, GRID + 1).astype(int)
  return [Block(f"{SCENE}_r{r}c{c}", slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
          for r in range(GRID) for c in range(GRID)]


def block_classes(landcover: np.ndarray) -> dict[str, frozenset[int]]:
  """Block id -> the classes covering at least MIN_CLASS_SHARE of it, for blocks with a
  labelled pixel."""
  out = {}
  for b in blocks(*landcover.shape):
    ids = landcover[b.rows, b.cols]
    counts = np.bincount(ids.ravel(), minlength=IGNORE + 1)[:IGNORE]
    if counts.any():
      out[b.id] = frozenset(np.flatnonzero(counts >= MIN_CLASS_SHARE * ids.size).tolist())
  return out


def split_of(classes_of: dict[str, frozenset[int]], val_fraction: float, test_fraction: float
             ) -> dict[str, str]:
  """Block -> split (see the module docstring): test, then val, in the hash order of
  `splits.assign`, each taking only blocks whose loss leaves train every class."""
  order = sorted(classes_of, key=lambda b: hashlib.sha256(b.encode()).hexdigest())
  n = len(order)
  wanted = {"test": max(round(test_fraction * n), int(n >= 2)),
            "val": max(round(val_fraction * n), int(n >= 3))}
  everything = frozenset().union(*classes_of.values())
  out = dict.fromkeys(order, "train")
  for split, k in wanted.items():
    for b in order:
      if k == 0:
        break
      rest = [classes_of[o] for o in order if out[o] == "train" and o != b]
      if out[b] == "train" and rest and frozenset().union(*rest) == everything:
        out[b] = split
        k -= 1
  return out


def _geo(b: Block, height: int, width: int) -> chip_lib.Geo:
  """The place of a block centre, offset from CENTRE at the nominal spacing (north up)."""
  dy = ((b.rows.start + b.rows.stop) / 2 - height / 2) * PIXEL_SPACING_M
  dx = ((b.cols.start + b.cols.stop) / 2 - width / 2) * PIXEL_SPACING_M
  lat = CENTRE[0] - dy / _METRES_PER_DEG
  lon = CENTRE[1] + dx / (_METRES_PER_DEG * math.cos(math.radians(CENTRE[0])))
  return sources.place(lat, lon, ("unlisted place", "unknown", "unknown"))


def chips(source: str, *, scenes: Container[str] | None = None, workers: int = 1
          ) -> Iterator[chip_lib.Chip | sources.Skipped]:
  """Every block of the scene as a Chip, or Skipped with the file and reason.

  scenes: only these block ids (all when None); workers: unused (one scene, decoded once).
  """
  del workers
  try:
    image_db, landcover = read_scene(source)
  except sources.SkipError as e:
    yield sources.Skipped(source, str(e))
    return
  h, w = landcover.shape
  for b in blocks(h, w):
    lc = landcover[b.rows, b.cols]
    if not np.any(lc != IGNORE):
      yield sources.Skipped(f"{os.path.join(source, LABELS)} block {b.id}",
                            "no labelled pixel in the block")
    elif scenes is None or b.id in scenes:
      yield chip_lib.Chip(id=b.id, scene_id=b.id, image_db=image_db[b.rows, b.cols],
                          imaging=IMAGING, geo=_geo(b, h, w), family="landform", landcover=lc)


def fill_unlabelled(landcover: np.ndarray) -> np.ndarray:
  """`landcover` with every IGNORE pixel set to the class of the nearest labelled pixel."""
  unlabelled = landcover == IGNORE
  if not unlabelled.any():
    return landcover
  _, (iy, ix) = ndimage.distance_transform_edt(unlabelled, return_indices=True)
  return landcover[iy, ix]


class _LabelledText:
  """The HCoT generator given each chip's mask without IGNORE pixels (`fill_unlabelled`)."""

  def __init__(self, generator):
    self._generator = generator
    self.backend = generator.backend

  def generate(self, chip: chip_lib.Chip):
    return self._generator.generate(
        dataclasses.replace(chip, landcover=fill_unlabelled(chip.landcover)))


class Polsf(archive.ArchiveBuilder):
  """PolSF AIRSAR San Francisco (L-band, |HH+VV| and |HV| in relative dB, land-cover masks with
  255 = unlabelled); splits by spatial block."""

  VERSION = tfds.core.Version(VERSION)
  chips_of = staticmethod(chips)

  def _split_assignment(self, unreadable: frozenset[str]) -> dict[str, str]:
    cfg = self.builder_config
    try:
      _, landcover = read_scene(cfg.source)
    except sources.SkipError as e:
      raise archive.NothingToBuild(f"polsf: nothing to build from {cfg.source}: {e}") from None
    blocks = {b: c for b, c in block_classes(landcover).items() if b not in unreadable}
    return split_of(blocks, cfg.val_fraction, cfg.test_fraction)


def builder(data_dir: str, *, source: str, generator, workers: int = 0,
            val_fraction: float = 0.1, test_fraction: float = 0.1) -> Polsf:
  """`source`: the folder holding SF-AIRSAR-Pauli.bmp and SF-AIRSAR-label2d.png."""
  cfg = archive.ArchiveConfig(name="default", source=os.path.abspath(source), workers=workers,
                              val_fraction=val_fraction, test_fraction=test_fraction)
  return archive.make(Polsf, data_dir, cfg, _LabelledText(generator))
