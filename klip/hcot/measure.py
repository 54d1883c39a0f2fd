"""Measurements of a chip shared by the HCoT levels and the consistency checker.

Metres per pixel of the chip grid, land-cover shares, and the size of every instance: the
length and width the text should state, from the best evidence available (a real measurement
such as AIS, else the known dimensions of a specific class such as an MSTAR vehicle, else the box),
or none when no evidence is plausible for the category.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from klip.data import chip as chip_lib
from klip.data import knowledge

# A size is plausible for a category within these factors of its range (boxes are axis-aligned
# and include wings, wakes of a pixel or so, and side-lobe smear).
LOW_TOLERANCE, HIGH_TOLERANCE = 1.6, 1.6
# Which categories an object "fits": its box length within the category range widened by this
# factor and half a pixel each way (the level-4 judgement, stricter than plausibility).
FIT_TOLERANCE = 1.1
# A class range this narrow (max / min) is a specific class whose real dimensions are known.
SPECIFIC_CLASS_RATIO = 1.5


@dataclasses.dataclass(frozen=True)
class Size:
  """What is known about one instance's size.

  box_length_m / box_width_m: the box's longer / shorter side in metres; length_m / width_m: the
  size to state (NaN when nothing plausible is known); source: "AIS", "class" or "box" ("" when
  none); box_agrees: whether the box is compatible with the stated length.
  """
  box_length_m: float
  box_width_m: float
  length_m: float
  width_m: float
  source: str
  box_agrees: bool


def metres_per_pixel(chip: chip_lib.Chip) -> float:
  """Ground metres per pixel of the chip grid (native spacing over the resize factor)."""
  return chip.imaging.pixel_spacing_m / chip.resize_factor


def fractions(landcover: np.ndarray, keep: np.ndarray | None = None) -> dict[str, float]:
  """Share of each land-cover class over the pixels where `keep` is true (all by default)."""
  ids = landcover if keep is None else landcover[keep]
  counts = np.bincount(ids.ravel(), minlength=len(chip_lib.LANDCOVER_CLASSES))
  total = max(int(counts.sum()), 1)
  return {name: float(counts[i] / total) for i, name in enumerate(chip_lib.LANDCOVER_CLASSES)}


def subtype_of(inst: chip_lib.Instance) -> knowledge.Subtype | None:
  """The knowledge-base subtype of an instance, when its subtype names one of its category."""
  sub = knowledge.objects().subtype(inst.subtype) if inst.subtype else None
  return sub if sub is not None and sub.category == inst.category else None


def plausible(category: str, length_m: float, mpp: float) -> bool:
  """Whether a length fits the category's range (with tolerance) and spans at least a pixel."""
  cls = knowledge.objects().categories.get(category)
  if cls is None or not math.isfinite(length_m) or length_m < mpp:
    return False
  lo, hi = cls.length_m
  return lo / LOW_TOLERANCE - mpp <= length_m <= hi * HIGH_TOLERANCE + 2 * mpp


def size(chip: chip_lib.Chip, inst: chip_lib.Instance) -> Size:
  """The size evidence of one instance of `chip`."""
  mpp = metres_per_pixel(chip)
  x0, y0, x1, y1 = inst.box
  box_len, box_wid = max(x1 - x0, y1 - y0) * mpp, min(x1 - x0, y1 - y0) * mpp
  sub = subtype_of(inst)
  length, width, source = float("nan"), float("nan"), ""
  if plausible(inst.category, inst.length_m, mpp):
    length, width, source = inst.length_m, inst.width_m, "AIS"
  elif sub is not None and sub.length_m[1] <= SPECIFIC_CLASS_RATIO * sub.length_m[0]:
    length, width, source = sub.length_m[0], sub.width_m[1], "class"
  elif plausible(inst.category, box_len, mpp):
    length, width, source = box_len, box_wid, "box"
  extra = width if math.isfinite(width) else 0.0
  agrees = (math.isfinite(length)
            and length / 2.5 - 2 * mpp <= box_len <= 2.0 * length + extra + 2 * mpp)
  return Size(box_len, box_wid, length, width, source, agrees)
