"""Reading real archives safely: paths kept inside the source, images sniffed by content, pixel
and range checks, places from lat/lon, and the `Skipped` record for anything unusable.

Every check raises `SkipError(reason)`; a builder turns it into `Skipped(path, reason)` and goes
on with the next record, so bad input is reported and never crashes a build nor passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import numpy as np
import tifffile
from PIL import Image

from klip.data import chip as chip_lib
from klip.data import knowledge

MIN_SIDE_PX = 8  # the smallest chip side kept (OpenSARShip's smallest ship chip is 13 px)
NEAR_CITY_KM = 100.0  # a chip closer than this to a known place belongs to it
REGION_KM = 300.0     # a chip closer than this is named "near" the place
_EARTH_RADIUS_KM = 6371.0
_MAGIC = {b"\x89PNG": "png", b"II*\x00": "tiff", b"MM\x00*": "tiff", b"II+\x00": "tiff",
          b"MM\x00+": "tiff", b"\xff\xd8\xff": "jpeg", b"BM": "bmp"}


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record that could not be used: the file (and line or field) and why."""
  path: str
  reason: str


class SkipError(ValueError):
  """The current record is unusable; the message is the reason."""


def inside(root: str, path: str) -> str:
  """`path` (absolute, or relative to `root`) resolved with symlinks; SkipError if it leaves
  `root` (through `..`, an absolute path or a symlink) or does not exist."""
  base = os.path.realpath(root)
  real = os.path.realpath(os.path.join(base, path))
  if os.path.commonpath([base, real]) != base:
    raise SkipError(f"path {path!r} escapes the source folder {root} (resolves to {real})")
  if not os.path.isfile(real):
    raise SkipError(f"file {path!r} does not exist")
  return real


def image_format(path: str) -> str:
  """The image format from the file's first bytes ("png", "tiff", "jpeg", "bmp"), whatever the
  extension says; SkipError for anything else."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise SkipError(f"cannot read image: {e}") from e
  for magic, fmt in _MAGIC.items():
    if head.startswith(magic):
      return fmt
  raise SkipError(f"not a PNG, TIFF, JPEG or BMP image (first bytes {head[:4]!r})")


def read_image(path: str) -> np.ndarray:
  """Pixels as float32 [H, W, C]; see read_pixels."""
  return read_pixels(path).astype(np.float32)


def read_pixels(path: str) -> np.ndarray:
  """Pixels [H, W, C] in the file's own dtype for a TIFF (via tifffile) or PNG/JPEG/BMP (via
  Pillow); the format is sniffed from the content. SkipError if it cannot be decoded."""
  fmt = image_format(path)
  try:
    if fmt == "tiff":
      pixels = tifffile.imread(path)
    else:
      with Image.open(path) as im:
        im.load()
        pixels = np.asarray(im)
  except Exception as e:  # any decoder error means a corrupt file
    raise SkipError(f"corrupt or unreadable {fmt.upper()} image: {e}") from e
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.ndim != 3:
    raise SkipError(f"image has shape {pixels.shape}, expected [H, W] or [H, W, C]")
  return pixels


def check_pixels(image: np.ndarray, channels: int) -> np.ndarray:
  """`image` if it is at least MIN_SIDE_PX on each side, finite and has `channels` channels;
  SkipError otherwise."""
  if image.size == 0 or min(image.shape[:2]) < 1:
    raise SkipError(f"empty image (shape {image.shape})")
  if min(image.shape[:2]) < MIN_SIDE_PX:
    raise SkipError(f"image is {image.shape[1]}x{image.shape[0]} px, smaller than "
                    f"{MIN_SIDE_PX} px on a side (one model patch): too small to upsample")
  if image.shape[-1] != channels:
    raise SkipError(f"image has {image.shape[-1]} channels, metadata lists {channels}")
  bad = int(np.count_nonzero(~np.isfinite(image)))
  if bad:
    raise SkipError(f"{bad} NaN or infinite pixels")
  return image


def power_to_db(power: np.ndarray, floor: float = 1e-6) -> np.ndarray:
  """10 log10 of linear power (sigma0); zeros (no signal) are floored at `floor` (-60 dB)."""
  if np.any(power < 0):
    raise SkipError(f"negative linear backscatter (min {float(power.min()):.3g})")
  return (10.0 * np.log10(np.maximum(power, floor))).astype(np.float32)


def number(value, name: str, low: float, high: float) -> float:
  """`value` as a float in [low, high]; SkipError naming the field otherwise."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise SkipError(f"field {name!r}: not a number: {value!r}") from None
  if isinstance(value, bool) or not low <= x <= high:
    raise SkipError(f"field {name!r}: {value!r} outside the physical range [{low}, {high}]")
  return x


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
  """Great-circle (haversine) distance."""
  p1, p2 = math.radians(lat1), math.radians(lat2)
  a = (math.sin((p2 - p1) / 2) ** 2
       + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
  return 2 * _EARTH_RADIUS_KM * math.asin(math.sqrt(min(a, 1.0)))


def latitude_climate(lat: float) -> str:
  """A coarse climate from latitude alone, for places far from every known city."""
  a = abs(lat)
  return ("tropical" if a < 23.5 else "subtropical" if a < 35 else "temperate" if a < 55
          else "subpolar" if a < 66.5 else "polar")


def place(lat: float, lon: float, far: tuple[str, str, str]) -> chip_lib.Geo:
  """The Geo of a chip centre from the known places (`knowledge.gazetteer()`: the cities and
  the places of real archives).

  Within NEAR_CITY_KM of the nearest place: that place with its country, climate, terrain and
  function. Farther: `far` = (place label, terrain, region function), e.g. ("open sea",
  "open sea", "open sea"); within REGION_KM the label reads "<label> near <place>" and the
  place's country and climate are kept, beyond it country is "unknown" and the climate comes
  from latitude alone.
  """
  lat = number(lat, "lat", -90.0, 90.0)
  lon = number(lon, "lon", -180.0, 180.0)
  city = min(knowledge.gazetteer(), key=lambda c: distance_km(lat, lon, c.lat, c.lon))
  km = distance_km(lat, lon, city.lat, city.lon)
  if km <= NEAR_CITY_KM:
    return chip_lib.Geo(city.name, city.country, lat, lon, city.climate, city.terrain,
                        city.region_function)
  label, terrain, function = far
  if km <= REGION_KM:
    return chip_lib.Geo(f"{label} near {city.name}", city.country, lat, lon, city.climate,
                        terrain, function)
  return chip_lib.Geo(label, "unknown", lat, lon, latitude_climate(lat), terrain, function)


def parallel_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
  """fn over items in order; `workers` processes (0: all cores, 1: in this process)."""
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    yield from map(fn, items)
    return
  with futures.ProcessPoolExecutor(workers) as pool:
    yield from pool.map(fn, items, chunksize=16)


def load_all(items: list, task_type: type, load: Callable, workers: int) -> Iterator:
  """`items` in order with each `task_type` item replaced by `load(item)` (decoded in `workers`
  processes, see parallel_map); other items (Skipped) pass through."""
  loaded = parallel_map(load, [t for t in items if isinstance(t, task_type)], workers)
  for item in items:
    yield next(loaded) if isinstance(item, task_type) else item
