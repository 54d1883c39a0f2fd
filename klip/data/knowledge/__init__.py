"""The knowledge base of the synthetic corpus: real cities and real SAR platform specifications.

Both tables are JSON files shipped next to this module. `load_cities(path)` and
`load_platforms(path)` parse and validate a file (a malformed entry raises ValueError naming the
file, the entry and the field); `cities()` and `platforms()` return the shipped tables, cached.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

from klip.data import chip as chip_lib

HERE = pathlib.Path(__file__).parent
REGION_FUNCTIONS = ("port", "airport", "urban core", "farmland", "industrial")
BANDS = ("P", "L", "S", "C", "X", "Ku", "Ka")
POLARISATIONS = ("HH", "HV", "VH", "VV")


@dataclasses.dataclass(frozen=True)
class City:
  """A real city: true centre coordinates, geography, and the land-cover mix around it.

  landcover_weights: relative frequency of each class of `chip.LANDCOVER_CLASSES` (same order),
  normalised to sum 1.
  """
  name: str
  country: str
  lat: float
  lon: float
  climate: str
  terrain: str
  region_function: str
  coastal: bool
  landcover_weights: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Mode:
  """One acquisition mode of a platform.

  pixel_spacing_m and incidence_deg are (min, max) ranges (equal ends for a fixed value);
  polarisations lists the channel combinations the mode delivers, co-pol first.
  """
  name: str
  pixel_spacing_m: tuple[float, float]
  incidence_deg: tuple[float, float]
  looks: int
  polarisations: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Platform:
  """A spaceborne SAR: its band, wavelength and acquisition modes."""
  name: str
  band: str
  wavelength_cm: float
  modes: tuple[Mode, ...]


class _Entry:
  """Reads the fields of one JSON entry, raising ValueError that names file, entry and field."""

  def __init__(self, path: pathlib.Path, where: str, raw: Any):
    self.path, self.where = path, where
    if not isinstance(raw, dict):
      self.fail(None, "is not a JSON object")
    self.raw = raw

  def fail(self, field: str | None, problem: str):
    name = f", field {field!r}" if field else ""
    raise ValueError(f"{self.path}: {self.where}{name}: {problem}")

  def get(self, field: str) -> Any:
    if field not in self.raw:
      self.fail(field, "is missing")
    return self.raw[field]

  def text(self, field: str, choices: tuple[str, ...] | None = None) -> str:
    value = self.get(field)
    if not isinstance(value, str) or not value.strip():
      self.fail(field, f"must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
      self.fail(field, f"must be one of {choices}, got {value!r}")
    return value

  def number(self, field: str, value: Any = None, low: float = -float("inf"),
             high: float = float("inf")) -> float:
    value = self.get(field) if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
      self.fail(field, f"must be a number in [{low}, {high}], got {value!r}")
    return float(value)

  def interval(self, field: str, low: float, high: float) -> tuple[float, float]:
    """A number or a [min, max] pair, returned as (min, max)."""
    value = self.get(field)
    if isinstance(value, list):
      if len(value) != 2:
        self.fail(field, f"must be a number or a [min, max] pair, got {value!r}")
      a, b = (self.number(field, v, low, high) for v in value)
      if a > b:
        self.fail(field, f"has min > max: {value!r}")
      return a, b
    v = self.number(field, value, low, high)
    return v, v

  def items(self, field: str) -> list:
    value = self.get(field)
    if not isinstance(value, list) or not value:
      self.fail(field, "must be a non-empty list")
    return value


def _read(path: pathlib.Path, key: str) -> list:
  path = pathlib.Path(path)
  try:
    doc = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read JSON: {e}") from e
  if not isinstance(doc, dict) or not isinstance(doc.get(key), list) or not doc[key]:
    raise ValueError(f"{path}: needs a non-empty list {key!r} at top level")
  return doc[key]


def _city(path: pathlib.Path, i: int, raw: Any) -> City:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"city {i} ({name})", raw)
  weights = e.get("landcover_weights")
  if not isinstance(weights, dict):
    e.fail("landcover_weights", "must be an object mapping land-cover class to weight")
  for cls in weights:
    if cls not in chip_lib.LANDCOVER_CLASSES:
      e.fail("landcover_weights", f"unknown class {cls!r}, expected {chip_lib.LANDCOVER_CLASSES}")
  w = [e.number("landcover_weights", weights.get(c, 0.0), 0.0) for c in chip_lib.LANDCOVER_CLASSES]
  if sum(w[:5]) <= 0:
    e.fail("landcover_weights", "needs a positive weight on an area class (water..mountain)")
  coastal = e.get("coastal")
  if not isinstance(coastal, bool):
    e.fail("coastal", f"must be true or false, got {coastal!r}")
  return City(name=e.text("name"), country=e.text("country"), lat=e.number("lat", low=-90, high=90),
              lon=e.number("lon", low=-180, high=180), climate=e.text("climate"),
              terrain=e.text("terrain"),
              region_function=e.text("region_function", REGION_FUNCTIONS),
              coastal=coastal, landcover_weights=tuple(v / sum(w) for v in w))


def _mode(path: pathlib.Path, where: str, raw: Any) -> Mode:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"{where} mode ({name})", raw)
  pols = e.items("polarisations")
  for combo in pols:
    if (not isinstance(combo, list) or not 1 <= len(combo) <= 2 or len(set(combo)) != len(combo)
        or any(p not in POLARISATIONS for p in combo)):
      e.fail("polarisations",
             f"each entry must list 1 or 2 distinct of {POLARISATIONS}, got {combo!r}")
  looks = e.get("looks")
  if isinstance(looks, bool) or not isinstance(looks, int) or not 1 <= looks <= 16:
    e.fail("looks", f"must be an integer in [1, 16], got {looks!r}")
  return Mode(name=e.text("name"), pixel_spacing_m=e.interval("pixel_spacing_m", 0.1, 100.0),
              incidence_deg=e.interval("incidence_deg", 1.0, 89.0), looks=looks,
              polarisations=tuple(tuple(c) for c in pols))


def _platform(path: pathlib.Path, i: int, raw: Any) -> Platform:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"platform {i} ({name})", raw)
  return Platform(name=e.text("name"), band=e.text("band", BANDS),
                  wavelength_cm=e.number("wavelength_cm", low=0.1, high=1000.0),
                  modes=tuple(_mode(path, e.where, m) for m in e.items("modes")))


def load_cities(path: str | pathlib.Path) -> tuple[City, ...]:
  """Parses and validates a cities JSON file."""
  path = pathlib.Path(path)
  out = tuple(_city(path, i, raw) for i, raw in enumerate(_read(path, "cities")))
  names = [c.name for c in out]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: duplicate city names")
  return out


def load_platforms(path: str | pathlib.Path) -> tuple[Platform, ...]:
  """Parses and validates a platforms JSON file."""
  path = pathlib.Path(path)
  return tuple(_platform(path, i, raw) for i, raw in enumerate(_read(path, "platforms")))


@functools.cache
def cities() -> tuple[City, ...]:
  """The shipped cities table."""
  return load_cities(HERE / "cities.json")


@functools.cache
def platforms() -> tuple[Platform, ...]:
  """The shipped platforms table."""
  return load_platforms(HERE / "platforms.json")
