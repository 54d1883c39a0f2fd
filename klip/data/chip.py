"""The in-memory SAR chip: what every data source produces before it becomes a record.

A `Chip` is the common currency between data sources (the simulator here, real archives
later), the text writer (eight structured fields) and the record schema (`schema.py`).
Everything is plain numpy and frozen dataclasses, so chips pickle cheaply across worker
processes.
"""

from __future__ import annotations

import dataclasses

from klip.data.caption import FAMILIES

import numpy as np

# Land-cover classes of the simulator's ground-truth mask (index = class id).
LANDCOVER_CLASSES = ("water", "urban", "vegetation", "bare_soil", "mountain", "road", "runway")

# Target categories the simulator places; real archives may use finer names.
TARGET_CATEGORIES = ("ship", "aircraft", "vehicle", "storage_tank")



@dataclasses.dataclass(frozen=True)
class Geo:
  """Where the chip is: the city it belongs to and the chip centre."""
  city: str
  country: str
  lat: float
  lon: float
  climate: str          # e.g. "temperate oceanic", "tropical monsoon"
  terrain: str          # e.g. "coastal plain", "river delta"
  region_function: str  # e.g. "port", "airport", "urban core", "farmland", "industrial"


@dataclasses.dataclass(frozen=True)
class Imaging:
  """How the chip was imaged."""
  platform: str          # e.g. "Sentinel-1"
  band: str              # e.g. "C"
  mode: str              # e.g. "IW"
  polarisations: tuple[str, ...]  # channel names in image order, e.g. ("VV", "VH")
  pixel_spacing_m: float  # native ground pixel spacing, metres per pixel
  incidence_deg: float
  orbit_direction: str   # "ascending" or "descending"


def _same(a, b) -> bool:
  return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
  """One annotated object: category and axis-aligned box in pixels (x0, y0, x1, y1), x1/y1
  exclusive, in the chip's pixel grid; what else is known about it (NaN / "" when unknown).

  subtype: a finer class from the source (an AIS ship type "Cargo", an MSTAR class "T72").
  length_m, width_m: real size (e.g. from AIS); heading_deg: 0 = north, clockwise;
  speed_kn: speed over ground in knots.
  """
  category: str
  box: tuple[float, float, float, float]
  subtype: str = ""
  length_m: float = float("nan")
  width_m: float = float("nan")
  heading_deg: float = float("nan")
  speed_kn: float = float("nan")

  def __eq__(self, other) -> bool:  # NaN ("unknown") equals NaN here
    if not isinstance(other, Instance):
      return NotImplemented
    return all(_same(getattr(self, f.name), getattr(other, f.name))
               for f in dataclasses.fields(self))

  def __hash__(self) -> int:
    return hash((self.category, self.box, self.subtype))


@dataclasses.dataclass(frozen=True)
class Chip:
  """One SAR chip with its metadata and (optional) ground truth.

  image_db: float32 [H, W, C] backscatter in dB, channels ordered as `imaging.polarisations`.
  resize_factor: output pixels per native pixel (1.0 when the chip is at native spacing).
  family: "target" or "landform": which eight fields describe it.
  landcover: uint8 [H, W] class ids into LANDCOVER_CLASSES, or None when unknown.
  instances: annotated objects (empty tuple when none or unknown).
  count: number of targets of interest, or -1 when unknown.
  scene_id: the scene the chip was cut from; splits are made on scenes, never on chips.
  """
  id: str
  scene_id: str
  image_db: np.ndarray
  imaging: Imaging
  geo: Geo
  family: str
  resize_factor: float = 1.0
  landcover: np.ndarray | None = None
  instances: tuple[Instance, ...] = ()
  count: int = -1

  @property
  def field_names(self) -> tuple[str, ...]:
    return FAMILIES[self.family]


def grid_cell(box: tuple[float, float, float, float], height: int, width: int) -> int:
  """The 3x3-grid cell (0..8, row-major from top-left) holding the box centre."""
  cx = 0.5 * (box[0] + box[2])
  cy = 0.5 * (box[1] + box[3])
  col = min(int(3 * cx / width), 2)
  row = min(int(3 * cy / height), 2)
  return 3 * row + col


GRID_NAMES = ("top left", "top", "top right", "left", "centre", "right", "bottom left",
              "bottom", "bottom right")
