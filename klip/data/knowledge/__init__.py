"""The knowledge base: real cities and places, SAR platforms, object classes, scattering rules.

Every table is a JSON file shipped next to this module, written by us. `load_cities`,
`load_platforms`, `load_objects`, `load_scattering` and `load_places` parse and validate a file
(a malformed entry raises ValueError naming the file, the entry and the field); `cities()`,
`platforms()`, `objects()`, `scattering()` and `gazetteer()` return the shipped tables, cached.
The simulator draws from cities.json and platforms.json only; the HCoT generator reads them all.
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
# Regional functions a place (not a simulator city) may also have.
PLACE_FUNCTIONS = REGION_FUNCTIONS + ("military test range",)
MECHANISMS = ("specular reflection", "surface scattering", "volume scattering", "double bounce",
              "layover", "foreshortening", "radar shadow", "side lobes", "wake",
              "corner reflection")


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


# ---------------------------------------------------------------------------------------------
# Object classes, scattering rules and places (read by the HCoT generator)


@dataclasses.dataclass(frozen=True)
class ObjectClass:
  """A target category: names, real size range (m), the land-cover classes it stands on."""
  name: str
  singular: str
  plural: str
  length_m: tuple[float, float]
  width_m: tuple[float, float]
  hosts: tuple[str, ...]
  description: str


@dataclasses.dataclass(frozen=True)
class Subtype:
  """A finer class of a category named by a real archive (AIS ship type, MSTAR class).

  height_m: NaN when unknown; aliases: other names of the same class in the archives.
  """
  name: str
  category: str
  label: str
  length_m: tuple[float, float]
  width_m: tuple[float, float]
  height_m: float
  aliases: tuple[str, ...]
  description: str


@dataclasses.dataclass(frozen=True)
class Objects:
  """The object table: categories by name and subtypes."""
  categories: dict[str, ObjectClass]
  subtypes: tuple[Subtype, ...]

  def subtype(self, name: str) -> Subtype | None:
    """The subtype whose name or alias matches `name` ignoring case and punctuation; failing
    that, the one whose key is the longest prefix of it ("Cargo - Hazard C" is a cargo ship)."""
    key = _key(name)
    if not key:
      return None
    keys = [(_key(a), s) for s in self.subtypes for a in (s.name,) + s.aliases]
    exact = [s for k, s in keys if k == key]
    if exact:
      return exact[0]
    prefixes = sorted(((len(k), s) for k, s in keys if key.startswith(k)), key=lambda t: -t[0])
    return prefixes[0][1] if prefixes else None


@dataclasses.dataclass(frozen=True)
class ScatteringRule:
  """How a surface or a target scatters: mechanisms, co-pol look, cross-pol behaviour."""
  name: str
  mechanisms: tuple[str, ...]
  look: str
  cross_pol: str


@dataclasses.dataclass(frozen=True)
class Scattering:
  """Scattering rules per land-cover class and per target category; a note per band."""
  surfaces: dict[str, ScatteringRule]
  targets: dict[str, ScatteringRule]
  bands: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Place:
  """A real place of the gazetteer: a city of cities.json or a place of places.json.

  setting: the water body or landscape it lies on, e.g. "the Yangtze River estuary on the East
  China Sea".
  """
  name: str
  country: str
  lat: float
  lon: float
  climate: str
  terrain: str
  region_function: str
  coastal: bool
  setting: str


def _key(name: str) -> str:
  return "".join(ch for ch in name.lower() if ch.isalnum())


def _flag(e: _Entry, field: str) -> bool:
  value = e.get(field)
  if not isinstance(value, bool):
    e.fail(field, f"must be true or false, got {value!r}")
  return value


def _object_class(path: pathlib.Path, i: int, raw: Any) -> ObjectClass:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"category {i} ({name})", raw)
  hosts = e.items("hosts")
  for h in hosts:
    if h not in chip_lib.LANDCOVER_CLASSES:
      e.fail("hosts", f"unknown land-cover class {h!r}, expected {chip_lib.LANDCOVER_CLASSES}")
  return ObjectClass(name=e.text("name"), singular=e.text("singular"), plural=e.text("plural"),
                     length_m=e.interval("length_m", 0.1, 1000.0),
                     width_m=e.interval("width_m", 0.1, 1000.0), hosts=tuple(hosts),
                     description=e.text("description"))


def _subtype(path: pathlib.Path, i: int, raw: Any, categories: dict[str, ObjectClass]) -> Subtype:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"subtype {i} ({name})", raw)
  aliases = e.get("aliases")
  if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
    e.fail("aliases", f"must be a list of non-empty strings, got {aliases!r}")
  height = e.number("height_m", low=0.1, high=100.0) if "height_m" in raw else float("nan")
  return Subtype(name=e.text("name"), category=e.text("category", tuple(categories)),
                 label=e.text("label"), length_m=e.interval("length_m", 0.1, 1000.0),
                 width_m=e.interval("width_m", 0.1, 1000.0), height_m=height,
                 aliases=tuple(aliases), description=e.text("description"))


def _rule(path: pathlib.Path, where: str, raw: Any, names: tuple[str, ...]) -> ScatteringRule:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"{where} ({name})", raw)
  mechanisms = e.items("mechanisms")
  for m in mechanisms:
    if m not in MECHANISMS:
      e.fail("mechanisms", f"unknown mechanism {m!r}, expected {MECHANISMS}")
  return ScatteringRule(name=e.text("name", names), mechanisms=tuple(mechanisms),
                        look=e.text("look"), cross_pol=e.text("cross_pol"))


def _place(path: pathlib.Path, i: int, raw: Any) -> Place:
  name = raw.get("name", "?") if isinstance(raw, dict) else "?"
  e = _Entry(path, f"place {i} ({name})", raw)
  return Place(name=e.text("name"), country=e.text("country"),
               lat=e.number("lat", low=-90, high=90), lon=e.number("lon", low=-180, high=180),
               climate=e.text("climate"), terrain=e.text("terrain"),
               region_function=e.text("region_function", PLACE_FUNCTIONS),
               coastal=_flag(e, "coastal"), setting=e.text("setting"))


def _unique(path: pathlib.Path, what: str, names: list[str]):
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: duplicate {what} names")


def load_objects(path: str | pathlib.Path) -> Objects:
  """Parses and validates an object-class JSON file."""
  path = pathlib.Path(path)
  classes = [_object_class(path, i, raw) for i, raw in enumerate(_read(path, "categories"))]
  _unique(path, "category", [c.name for c in classes])
  categories = {c.name: c for c in classes}
  subtypes = tuple(_subtype(path, i, raw, categories)
                   for i, raw in enumerate(_read(path, "subtypes")))
  _unique(path, "subtype", [s.name for s in subtypes])
  return Objects(categories=categories, subtypes=subtypes)


def load_scattering(path: str | pathlib.Path) -> Scattering:
  """Parses and validates a scattering-rules JSON file."""
  path = pathlib.Path(path)
  surfaces = [_rule(path, f"surface {i}", raw, chip_lib.LANDCOVER_CLASSES)
              for i, raw in enumerate(_read(path, "surfaces"))]
  targets = [_rule(path, f"target {i}", raw, tuple(objects().categories))
             for i, raw in enumerate(_read(path, "targets"))]
  bands = {}
  for i, raw in enumerate(_read(path, "bands")):
    name = raw.get("name", "?") if isinstance(raw, dict) else "?"
    e = _Entry(path, f"band {i} ({name})", raw)
    bands[e.text("name", BANDS)] = e.text("note")
  _unique(path, "surface", [r.name for r in surfaces])
  _unique(path, "target", [r.name for r in targets])
  return Scattering(surfaces={r.name: r for r in surfaces}, targets={r.name: r for r in targets},
                    bands=bands)


def load_places(path: str | pathlib.Path, known_cities: tuple[City, ...]) -> tuple[Place, ...]:
  """Parses and validates a places JSON file: its places, then `known_cities` as places with the
  file's settings (every city needs one)."""
  path = pathlib.Path(path)
  out = [_place(path, i, raw) for i, raw in enumerate(_read(path, "places"))]
  settings = json.loads(path.read_text()).get("settings")  # valid JSON: _read parsed it
  if not isinstance(settings, dict):
    raise ValueError(f"{path}: needs an object 'settings' mapping city name to setting")
  names = {c.name for c in known_cities}
  for name, setting in settings.items():
    if name not in names:
      raise ValueError(f"{path}: settings entry {name!r}: not a city of the cities table")
    if not isinstance(setting, str) or not setting.strip():
      raise ValueError(f"{path}: settings entry {name!r}: must be a non-empty string")
  for c in known_cities:
    if c.name not in settings:
      raise ValueError(f"{path}: settings: city {c.name!r} has no setting")
    out.append(Place(name=c.name, country=c.country, lat=c.lat, lon=c.lon, climate=c.climate,
                     terrain=c.terrain, region_function=c.region_function, coastal=c.coastal,
                     setting=settings[c.name]))
  _unique(path, "place", [p.name for p in out])
  return tuple(out)


@functools.cache
def objects() -> Objects:
  """The shipped object classes and subtypes."""
  return load_objects(HERE / "objects.json")


@functools.cache
def scattering() -> Scattering:
  """The shipped scattering rules."""
  return load_scattering(HERE / "scattering.json")


@functools.cache
def gazetteer() -> tuple[Place, ...]:
  """Every known place: places.json and the cities of cities.json."""
  return load_places(HERE / "places.json", cities())
