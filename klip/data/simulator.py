"""A physically motivated SAR scene simulator producing `chip.Chip`s with exact ground truth.

Each chip is a function of (index, seed, size, num_channels) only, drawn from
`np.random.default_rng([seed, index])`, so chips can be made in any order and in parallel:

1. a real city (`knowledge.cities()`), the scene of the chip;
2. a real platform, mode, polarisation pair, incidence and orbit direction
   (`knowledge.platforms()`);
3. a land-cover layout: smooth random fields weighted by the city's land-cover mix, relief in
   mountains, roads, runway and apron;
4. mean backscatter (sigma0) per class, band, polarisation and incidence; double-bounce lines
   along building rows; foreshortening, layover and radar shadow from the relief and look direction;
5. targets where they belong (ships on water with wakes, aircraft on the airfield, vehicles on
   roads, storage tanks on cleared ground by the water), sized in metres and converted with the
   pixel spacing; strong targets get a side-lobe cross;
6. thermal noise and multiplicative speckle (Gamma with the mode's looks), then dB clipped to
   [-35, +15].

A target is placed, and so reported, only where its pixels show it, since the count, sizes and
grid positions of the text are read off the instances: its box's longest side is at least
`MIN_TARGET_PX`, its silhouette covers at least `MIN_TARGET_AREA_PX`, and its signal-to-clutter
ratio before speckle (`scr_db`) is at least `MIN_SCR_DB` in every channel. A draw that fails is
drawn again (size, brightness, position, heading) up to `PLACEMENT_TRIES` times, then dropped; a
target chip left without targets is a landform chip. So vehicles (4-12 m) appear only at about
3 m spacing or finer. Storage tanks stand on bare or grassed ground, as tank farms do, not among
buildings whose double bounce is as bright as a tank; their near-range rim, a shell-ground
dihedral, is one of the brightest returns of a port (+10 to +16 dB here).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
from typing import Iterable, Iterator

import numpy as np
from scipy import ndimage

from klip.data import chip as chip_lib
from klip.data import knowledge

WATER, URBAN, VEGETATION, BARE_SOIL, MOUNTAIN, ROAD, RUNWAY = range(len(chip_lib.LANDCOVER_CLASSES))
NUM_AREA_CLASSES = 5  # water..mountain are laid out as regions; roads and runways are drawn on top
DB_RANGE = (-35.0, 15.0)
NESZ_DB = -30.0  # noise-equivalent sigma0: the floor seen in radar shadow
# Visibility of a reported target. The model sees a 64 px chip as 8 x 8 patches of 8 px: a target
# whose box's longest side is at least half a patch fills a good part of one token, while one of
# 2 px is a sixteenth of a patch, the size of a speckle grain. A silhouette of at least 2 px^2
# rules out slivers (a 4 px hull 0.4 px wide).
MIN_TARGET_PX = 4.0
MIN_TARGET_AREA_PX = 2.0
# A box detector (box mean against the median of a 2 px ring, speckled image) at a 5 % false-alarm
# rate on target-free boxes finds about 95 % of targets of 10-15 dB `scr_db` and all but a few
# of those above 15 dB, but only 50-70 % at 6-8 dB and 85 % at 8-10 dB: clutter such as urban
# blocks and land edges is itself several dB above its surroundings, and 1-4 looks leave
# 2.4-5.6 dB of speckle per pixel.
MIN_SCR_DB = 10.0
SCR_RING_PX = 2  # width (px) of the clutter ring around a target's box in `scr_db`
PLACEMENT_TRIES = 24  # draws per wanted target before it is dropped

# Co-pol (VV) sigma0 in dB at C band and 35 deg incidence, its incidence slope (dB/deg) and the
# cross-pol drop (dB), per land-cover class: specular water is dark and drops fast with incidence,
# urban double bounce is bright and strongly co-polarised, vegetation volume scattering keeps
# cross-pol close to co-pol.
CO_DB = np.array([-22.0, 2.0, -9.0, -14.0, -8.0, -20.0, -24.0])
INCIDENCE_SLOPE = np.array([-0.35, -0.05, -0.05, -0.2, -0.1, -0.3, -0.3])
CROSS_DROP_DB = np.array([10.0, 8.0, 6.0, 9.0, 6.0, 9.0, 8.0])
# Band offsets to CO_DB: longer waves see smoother surfaces and pass through canopies.
BAND_DB = {"L": np.array([-4.0, 0.0, -3.0, -2.0, -2.0, -4.0, -4.0]),
           "C": np.zeros(7),
           "X": np.array([1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 1.0])}
# HH minus VV in dB per degree of incidence above 20 deg (Bragg surfaces), and flat offsets
# (double bounce is stronger in HH).
HH_SLOPE = np.array([-0.15, 0.0, 0.0, -0.05, 0.0, -0.1, -0.1])
HH_OFFSET = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])

# Real-world length range in metres of each target category.
TARGET_LENGTH_M = {"ship": (20.0, 300.0), "aircraft": (20.0, 70.0), "vehicle": (4.0, 12.0),
                   "storage_tank": (20.0, 80.0)}
# How likely each category is as the subject of a target chip, per regional function.
CATEGORY_WEIGHTS = {
    "port": {"ship": 0.6, "storage_tank": 0.25, "vehicle": 0.1, "aircraft": 0.05},
    "airport": {"aircraft": 0.7, "vehicle": 0.2, "ship": 0.05, "storage_tank": 0.05},
    "urban core": {"vehicle": 0.5, "ship": 0.2, "aircraft": 0.15, "storage_tank": 0.15},
    "farmland": {"vehicle": 0.5, "aircraft": 0.2, "ship": 0.15, "storage_tank": 0.15},
    "industrial": {"storage_tank": 0.45, "ship": 0.25, "vehicle": 0.2, "aircraft": 0.1},
}
# The land-cover weight a city needs for a category to occur there at all.
CATEGORY_HOST = {"ship": WATER, "aircraft": RUNWAY, "vehicle": ROAD, "storage_tank": WATER}
TARGET_FAMILY_P = 0.5


def chip_id(index: int, seed: int) -> str:
  """The id of chip `index` of corpus `seed`."""
  return f"syn-{seed}-{index:07d}"


def scene_city(index: int, seed: int) -> knowledge.City:
  """The city chip `index` belongs to (its scene), without simulating the image."""
  return _draw_city(np.random.default_rng([seed, index]))


def _draw_city(rng: np.random.Generator) -> knowledge.City:
  cities = knowledge.cities()
  return cities[int(rng.integers(len(cities)))]


def simulate_chip(index: int, seed: int, size: int = 64, num_channels: int = 2) -> chip_lib.Chip:
  """Simulates chip `index` of corpus `seed`: a [size, size, num_channels] dB image with truth."""
  return _simulate(index, seed, size, num_channels, None)


def simulate_chip_traced(index: int, seed: int, size: int = 64, num_channels: int = 2
                         ) -> tuple[chip_lib.Chip, list[TargetTrace]]:
  """`simulate_chip` and, per reported instance in order, what its visibility was judged on."""
  trace: list[TargetTrace] = []
  return _simulate(index, seed, size, num_channels, trace), trace


def _simulate(index: int, seed: int, size: int, num_channels: int,
              trace: list[TargetTrace] | None) -> chip_lib.Chip:
  if num_channels not in (1, 2):
    raise ValueError(f"num_channels must be 1 or 2, got {num_channels}")
  rng = np.random.default_rng([seed, index])
  city = _draw_city(rng)
  imaging, looks = _draw_imaging(rng, num_channels)
  category = _draw_category(rng, city, imaging.pixel_spacing_m, size)
  scene = _Scene(rng, city, imaging, size, category)
  sigma = _backscatter(rng, scene, imaging)
  instances = _place_targets(rng, scene, imaging, sigma, category, trace) if category else ()
  image = _acquire(rng, sigma, looks)
  km = rng.normal(0.0, 3.0, 2)
  geo = chip_lib.Geo(city=city.name, country=city.country, lat=city.lat + km[0] / 111.0,
                     lon=city.lon + km[1] / (111.0 * math.cos(math.radians(city.lat))),
                     climate=city.climate, terrain=city.terrain,
                     region_function=city.region_function)
  family = "target" if instances else "landform"
  return chip_lib.Chip(id=chip_id(index, seed), scene_id=city.name, image_db=image,
                       imaging=imaging, geo=geo, family=family, landcover=scene.landcover,
                       instances=instances, count=len(instances))


def simulate(indices: Iterable[int], seed: int, size: int = 64, num_channels: int = 2,
             workers: int | None = None) -> Iterator[chip_lib.Chip]:
  """Chips for `indices`, in order; `workers` processes (all cores when None), 1 = no pool.

  Workers start through a forkserver, so a calling script must guard its entry point with
  `if __name__ == "__main__":`.
  """
  workers = workers or os.cpu_count() or 1
  make = functools.partial(simulate_chip, seed=seed, size=size, num_channels=num_channels)
  if workers == 1:
    yield from map(make, indices)
    return
  indices = list(indices)
  chunk = max(1, min(64, len(indices) // (4 * workers)))
  # forkserver: safe when the parent already runs threads (e.g. JAX), cheap per worker.
  with multiprocessing.get_context("forkserver").Pool(workers) as pool:
    yield from pool.imap(make, indices, chunksize=chunk)


# ---------------------------------------------------------------------------------------------
# Acquisition and target draws


def _draw_imaging(rng: np.random.Generator, num_channels: int) -> tuple[chip_lib.Imaging, int]:
  """A platform, mode, polarisations, pixel spacing, incidence and orbit; also the looks."""
  options = [(p, m) for p in knowledge.platforms() for m in p.modes
             if any(len(c) >= num_channels for c in m.polarisations)]
  platform, mode = options[int(rng.integers(len(options)))]
  combos = [c for c in mode.polarisations if len(c) >= num_channels]
  pols = combos[int(rng.integers(len(combos)))][:num_channels]
  spacing = round(float(rng.uniform(*mode.pixel_spacing_m)), 1)
  incidence = round(float(rng.uniform(*mode.incidence_deg)), 1)
  orbit = ("ascending", "descending")[int(rng.integers(2))]
  imaging = chip_lib.Imaging(platform=platform.name, band=platform.band, mode=mode.name,
                             polarisations=tuple(pols), pixel_spacing_m=spacing,
                             incidence_deg=incidence, orbit_direction=orbit)
  return imaging, mode.looks


def length_range_m(category: str, spacing: float, size: int) -> tuple[float, float] | None:
  """Lengths (m) of `category` that are resolvable at `spacing` and fit a `size` chip, or None."""
  lo, hi = TARGET_LENGTH_M[category]
  lo, hi = max(lo, MIN_TARGET_PX * spacing), min(hi, 0.6 * size * spacing)
  return (lo, hi) if lo <= hi else None


def _draw_category(rng: np.random.Generator, city: knowledge.City, spacing: float,
                   size: int) -> str | None:
  """The target category of a target chip, or None for a landform chip."""
  weights = CATEGORY_WEIGHTS[city.region_function]
  feasible = [c for c in chip_lib.TARGET_CATEGORIES
              if city.landcover_weights[CATEGORY_HOST[c]] > 0 and length_range_m(c, spacing, size)]
  if rng.random() >= TARGET_FAMILY_P or not feasible:
    return None
  p = np.array([weights[c] for c in feasible])
  return feasible[int(rng.choice(len(feasible), p=p / p.sum()))]


# ---------------------------------------------------------------------------------------------
# Scene layout


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (y, x), each [size, size] (pixel i spans [i, i + 1)); shared,
  never written."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  y.flags.writeable = x.flags.writeable = False
  return y, x


@functools.lru_cache(maxsize=64)
def _upsampler(size: int, cells: int) -> np.ndarray:
  """Cubic B-spline weights [size, cells + 3] from a coarse grid to pixels, rows scaled to unit
  norm so that upsampled white noise keeps unit variance."""
  t = (np.arange(size) + 0.5) * cells / size
  d = np.abs(t[:, None] - np.arange(-1, cells + 2)[None, :])
  w = np.where(d < 1, 2 / 3 - d ** 2 + d ** 3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
  w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True))
  w.flags.writeable = False
  return w


def _smooth_fields(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
  """n smooth random fields [n, size, size] of unit variance, about `cells` blobs across."""
  up = _upsampler(size, cells)
  coarse = rng.standard_normal((n, cells + 3, cells + 3))
  rows = (up @ coarse).reshape(n * size, cells + 3)  # one BLAS product for the columns
  return (rows @ up.T).reshape(n, size, size)


def _line_distance(x: np.ndarray, y: np.ndarray, px: float, py: float, angle: float) -> np.ndarray:
  """Distance (px) of every pixel to the line through (px, py) at `angle` (radians from +x)."""
  return np.abs(-(x - px) * math.sin(angle) + (y - py) * math.cos(angle))


class _Scene:
  """Land-cover mask, relief and linear features of one chip.

  landcover: uint8 [H, W]; height_m: [H, W]; road_angle: [H, W] direction (radians) of the road
  at road pixels; airfield_angle: runway direction, or None without an airfield; look: +1 when
  the radar looks east (+x, right-looking on an ascending orbit, north-up grid), -1 when west.
  """

  def __init__(self, rng: np.random.Generator, city: knowledge.City, imaging: chip_lib.Imaging,
               size: int, category: str | None):
    self.size, self.spacing = size, imaging.pixel_spacing_m
    self.look = 1.0 if imaging.orbit_direction == "ascending" else -1.0
    weights = np.array(city.landcover_weights)
    self._regions(rng, weights, category)
    self.road_angle = np.full((size, size), np.nan)
    n_roads = rng.poisson(weights[ROAD] * 30.0 * min(size * self.spacing / 1000.0, 3.0))
    if category == "vehicle":
      n_roads = max(n_roads, int(rng.integers(1, 4)))
    for _ in range(n_roads):
      self._road(rng)
    self.airfield_angle = None
    p_airfield = 1.0 if category == "aircraft" else min(1.0, 6.0 * weights[RUNWAY])
    if rng.random() < p_airfield:
      self._airfield(rng)

  def _regions(self, rng: np.random.Generator, weights: np.ndarray, category: str | None):
    """Area classes from smooth fields competing with log-priors drawn around the city mix."""
    area = weights[:NUM_AREA_CLASSES]
    prior = np.zeros(NUM_AREA_CLASSES)
    present = area > 0
    prior[present] = rng.dirichlet(8.0 * area[present] / area.sum())
    if category == "ship":
      prior[WATER] = max(prior[WATER], rng.uniform(0.55, 0.9))
    elif category == "storage_tank":
      prior[WATER] = rng.uniform(0.2, 0.4)
      prior[BARE_SOIL] = max(prior[BARE_SOIL], 0.3)
    elif category == "aircraft":
      prior[WATER] *= 0.2
    prior = prior / prior.sum()
    extent_m = self.size * self.spacing
    cells = max(1, math.ceil(extent_m / 400.0))
    fields = (_smooth_fields(rng, NUM_AREA_CLASSES, self.size, cells)
              + 0.5 * _smooth_fields(rng, NUM_AREA_CLASSES, self.size, 2 * cells))
    scores = np.log(prior + 1e-9)[:, None, None] + 1.2 * fields
    self.landcover = np.argmax(scores, axis=0).astype(np.uint8)
    # Relief: ridges of a few hundred metres, faded out of the mountain class.
    others = np.delete(scores, MOUNTAIN, axis=0).max(axis=0)
    inside = 1.0 / (1.0 + np.exp(-3.0 * (scores[MOUNTAIN] - others)))
    ridge_cells = max(1, math.ceil(extent_m / rng.uniform(400.0, 700.0)))
    ridges = _smooth_fields(rng, 1, self.size, ridge_cells)[0]
    self.height_m = rng.uniform(150.0, 450.0) * inside * (1.0 + ridges)

  def _road(self, rng: np.random.Generator):
    y, x = _grid(self.size)
    width_px = max(rng.uniform(8.0, 25.0) / self.spacing, 1.0)
    angle = rng.uniform(0.0, math.pi)
    px, py = rng.uniform(0, self.size, 2)
    on = (_line_distance(x, y, px, py, angle) < width_px / 2) & (self.landcover != WATER)
    self.landcover[on] = ROAD
    self.road_angle[on] = angle

  def _airfield(self, rng: np.random.Generator):
    """A runway across the chip with a parallel apron, both paved (class runway)."""
    y, x = _grid(self.size)
    angle = rng.uniform(0.0, math.pi)
    px, py = rng.uniform(0.2 * self.size, 0.8 * self.size, 2)
    dist = -(x - px) * math.sin(angle) + (y - py) * math.cos(angle)
    runway_half = max(rng.uniform(22.0, 30.0) / self.spacing, 0.5)
    gap = rng.uniform(40.0, 100.0) / self.spacing
    apron = max(rng.uniform(80.0, 250.0) / self.spacing, 1.0)
    side = rng.choice((-1.0, 1.0))
    paved = (np.abs(dist) < runway_half) | ((side * dist > runway_half + gap)
                                           & (side * dist < runway_half + gap + apron))
    self.landcover[paved] = RUNWAY
    self.road_angle[paved] = np.nan
    self.airfield_angle = angle


# ---------------------------------------------------------------------------------------------
# Backscatter


def is_cross_pol(pol: str) -> bool:
  """True for HV/VH."""
  return pol[0] != pol[1]


def class_sigma0_db(imaging: chip_lib.Imaging) -> np.ndarray:
  """Mean sigma0 (dB) per channel and land-cover class, [C, num_classes], on flat ground."""
  theta = imaging.incidence_deg
  co = CO_DB + INCIDENCE_SLOPE * (theta - 35.0) + BAND_DB.get(imaging.band, BAND_DB["C"])
  rows = []
  for pol in imaging.polarisations:
    if is_cross_pol(pol):
      rows.append(co - CROSS_DROP_DB)
    elif pol == "HH":
      rows.append(co + HH_SLOPE * max(theta - 20.0, 0.0) + HH_OFFSET)
    else:
      rows.append(co)
  return np.stack(rows)


def _terrain_factor(scene: _Scene, imaging: chip_lib.Imaging) -> np.ndarray:
  """Linear brightness factor of the relief: foreshortening, layover (bright), shadow (zero)."""
  theta = math.radians(imaging.incidence_deg)
  h = scene.height_m
  look = scene.look
  slope = look * np.gradient(h, axis=1) / scene.spacing  # ground rising away from the sensor
  local = theta - np.arctan(slope)  # local incidence angle
  factor = np.clip(math.sin(theta) / np.maximum(np.sin(local), 1e-3), 0.25, 6.0)
  factor[local <= 0.0] = 10.0  # layover: slopes steeper than the incidence face the sensor
  # Radar shadow: a ridge nearer the sensor hides the ground behind it from the beam.
  ground = np.arange(scene.size) * scene.spacing / math.tan(theta)
  lifted = (h if look > 0 else h[:, ::-1]) + ground
  hidden = lifted < np.maximum.accumulate(lifted, axis=1) - 1.0
  factor[hidden if look > 0 else hidden[:, ::-1]] = 0.0
  return factor


def _block_offsets(rng: np.random.Generator, size: int, spacing: float,
                   period_m: tuple[float, float], angle: float,
                   spread_db: float) -> tuple[np.ndarray, np.ndarray, float]:
  """Per-block random dB offsets on a rotated grid; also the across-row coordinate (m) and the
  across-row period (m)."""
  y, x = _grid(size)
  u = (x * math.cos(angle) - y * math.sin(angle)) * spacing
  v = (x * math.sin(angle) + y * math.cos(angle)) * spacing
  pu, pv = rng.uniform(*period_m, 2)
  table = rng.normal(0.0, spread_db, 61)
  idx = (np.floor(u / pu).astype(np.int64) * 31 + np.floor(v / pv).astype(np.int64) * 17) % 61
  return table[idx], u, pu


def _backscatter(rng: np.random.Generator, scene: _Scene, imaging: chip_lib.Imaging) -> np.ndarray:
  """Noise-free sigma0, linear, [C, H, W]."""
  size, spacing, lc = scene.size, scene.spacing, scene.landcover
  base = class_sigma0_db(imaging)[:, lc]  # [C, H, W]
  cells = max(1, math.ceil(size * spacing / 300.0))
  texture = 1.5 * _smooth_fields(rng, 1, size, cells)[0]
  # Farmland parcels: vegetation and bare soil vary field by field.
  parcels, _, _ = _block_offsets(rng, size, spacing, (80.0, 300.0), rng.uniform(0, math.pi), 2.0)
  texture += np.where((lc == VEGETATION) | (lc == BARE_SOIL), parcels, 0.0)
  # Built-up blocks: bright double-bounce lines where walls meet the ground, dark streets behind;
  # strongest when building rows run along the flight track (vertical in the image).
  aligned = rng.random() < 0.5
  angle = rng.normal(0.0, math.radians(5.0)) if aligned else rng.uniform(-math.pi / 4, math.pi / 4)
  blocks, u, period = _block_offsets(rng, size, spacing, (30.0, 90.0), angle, 2.5)
  phase = np.mod(u, period)
  wall = max(spacing, 3.0)
  street = np.clip(period * 0.3, wall, period - wall)
  urban = lc == URBAN
  boost = 6.0 + 8.0 * math.exp(-(math.degrees(angle) / 8.0) ** 2)
  line = urban & (phase < wall)
  texture += np.where(urban, blocks - 5.0 * ((phase >= wall) & (phase < wall + street)), 0.0)
  db = base + texture
  for c, pol in enumerate(imaging.polarisations):
    db[c][line] += 0.3 * boost if is_cross_pol(pol) else boost
  return np.power(10.0, db / 10.0) * _terrain_factor(scene, imaging)


# ---------------------------------------------------------------------------------------------
# Targets


class _Footprint:
  """A target's parts in its own frame (u along the heading, v across), in pixels.

  parts: rows (du, dv, half_u, half_v, gain_db) of rectangles in that frame; extent: the
  image-axis bounds (x_min, y_min, x_max, y_max) of all parts relative to the centre, at least
  one pixel wide.
  """

  def __init__(self, parts: list[tuple[float, float, float, float, float]], angle: float):
    self.parts, self.angle = np.array(parts), angle
    c, s = math.cos(angle), math.sin(angle)
    du, dv, hu, hv = (self.parts[:, i:i + 1] for i in range(4))
    u = du + hu * np.array([1, 1, -1, -1])
    v = dv + hv * np.array([1, -1, 1, -1])
    x, y = u * c - v * s, u * s + v * c
    x0, x1 = min(float(x.min()), -0.5), max(float(x.max()), 0.5)
    y0, y1 = min(float(y.min()), -0.5), max(float(y.max()), 0.5)
    self.extent = (x0, y0, x1, y1)


def _coverage(coord: np.ndarray, centre: float, half: float) -> np.ndarray:
  """Overlap of [centre - half, centre + half] with each unit pixel at `coord`."""
  return np.clip(np.minimum(coord + 0.5, centre + half) - np.maximum(coord - 0.5, centre - half),
                 0.0, 1.0)


def _rasterise(fp: _Footprint, cx: float, cy: float, sigma_db: float,
               size: int) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
  """A footprint on the pixel grid: the window (y0, y1, x0, x1) it touches, the fraction of each
  window pixel its silhouette covers, and the linear intensity it adds there."""
  x0, x1 = max(int(cx + fp.extent[0]) - 1, 0), min(int(cx + fp.extent[2]) + 2, size)
  y0, y1 = max(int(cy + fp.extent[1]) - 1, 0), min(int(cy + fp.extent[3]) + 2, size)
  y, x = np.mgrid[y0:y1, x0:x1] + 0.5
  c, s = math.cos(fp.angle), math.sin(fp.angle)
  u = (x - cx) * c + (y - cy) * s
  v = -(x - cx) * s + (y - cy) * c
  cover = np.zeros(u.shape)
  added = np.zeros(u.shape)
  for du, dv, hu, hv, gain in fp.parts:
    part = _coverage(u, du, hu) * _coverage(v, dv, hv)
    cover = np.maximum(cover, part)
    added = np.maximum(added, part * 10.0 ** ((sigma_db + gain) / 10.0))
  return (y0, y1, x0, x1), cover, added


def box_pixels(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
  """The whole pixels (x0, y0, x1, y1), x1/y1 exclusive, that a box touches in a `size` chip."""
  x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
  x1, y1 = max(math.ceil(box[2]), x0 + 1), max(math.ceil(box[3]), y0 + 1)
  return x0, y0, min(x1, size), min(y1, size)


def scr_db(clutter: np.ndarray, window: tuple[int, int, int, int], cover: np.ndarray,
           added: np.ndarray, box: tuple[float, float, float, float]) -> float:
  """Signal-to-clutter ratio (dB) of a target before speckle, in its weakest channel.

  clutter: noise-free sigma0 [C, H, W] without the target; window, cover, added: the target's
  raster (`_rasterise`); box: its box. The signal is the mean sigma0 (clutter + target + noise
  floor) over the silhouette, each pixel weighted by the fraction the target covers; the clutter
  is the larger of the same weighted mean without the target and the median over a ring
  `SCR_RING_PX` wide around the box, so that a target must both brighten its own pixels and
  stand out from its surroundings. The median (as in ordered-statistic CFAR detectors) keeps a
  clutter edge or a neighbour in part of the ring from hiding a target that stands out from the
  rest: an aircraft on a dark apron beside bright buildings is still seen.
  """
  y0, y1, x0, x1 = window
  size = clutter.shape[1]
  floor = clutter + 10.0 ** (NESZ_DB / 10.0)
  weight = cover / cover.sum()
  local = (floor[:, y0:y1, x0:x1] * weight).sum(axis=(1, 2))
  signal = local + float((added * weight).sum())
  bx0, by0, bx1, by1 = box_pixels(box, size)
  r = SCR_RING_PX
  ring = np.zeros((size, size), dtype=bool)
  ring[max(by0 - r, 0):by1 + r, max(bx0 - r, 0):bx1 + r] = True
  ring[by0:by1, bx0:bx1] = False
  around = np.median(floor[:, ring], axis=1) if ring.any() else local
  return float(np.min(10.0 * np.log10(signal / np.maximum(local, around))))


def _side_lobes(sigma: np.ndarray, cx: float, cy: float, peak: float):
  """The sinc-like cross of a strong point scatterer along range and azimuth (-13 dB first lobe)."""
  size = sigma.shape[1]
  ix, iy = min(int(cx), size - 1), min(int(cy), size - 1)
  d = np.arange(size, dtype=np.float64)
  lobe_x = 0.05 * peak / (1.0 + np.abs(d - ix) / 2.0) ** 2
  lobe_y = 0.05 * peak / (1.0 + np.abs(d - iy) / 2.0) ** 2
  lobe_x[ix] = lobe_y[iy] = 0.0
  sigma[:, iy, :] += lobe_x
  sigma[:, :, ix] += lobe_y


def _wake(rng: np.random.Generator, water: np.ndarray, cx: float, cy: float, angle: float,
          length: float, width: float) -> np.ndarray:
  """A moving ship's wake on water, as a sigma0 factor [H, W]: a dark turbulent trail astern and
  two bright Kelvin arms."""
  y, x = _grid(water.shape[0])
  c, s = math.cos(angle), math.sin(angle)
  behind = -((x - cx) * c + (y - cy) * s) - length / 2  # distance astern of the stern
  across = -(x - cx) * s + (y - cy) * c
  trail = rng.uniform(3.0, 8.0) * length
  factor = np.ones_like(x)
  widening = width * (0.6 + behind / length / 4)
  factor[(behind > 0) & (behind < trail) & (np.abs(across) < widening)] = 0.3
  kelvin = math.tan(math.radians(19.47))
  arms = (behind > 0) & (behind < 0.6 * trail) & (np.abs(np.abs(across) - behind * kelvin) < 0.6)
  factor[arms] = 2.5
  return np.where(water, factor, 1.0)


# Shapes: (rng, length px, spacing m) -> (parts of a `_Footprint`, width across in px).


def _ship(rng, length, spacing):
  """Hull with bright superstructure and bow."""
  width = length / rng.uniform(5.5, 8.0)
  parts = [(0.0, 0.0, length / 2, width / 2, 0.0),
           (0.45 * length, 0.0, 0.05 * length, width / 3, 6.0)]
  for du in rng.uniform(-0.4, 0.3, int(rng.integers(1, 4))) * length:
    parts.append((du, 0.0, 0.05 * length, width * 0.4, float(rng.uniform(6.0, 12.0))))
  return parts, width


def _aircraft(rng, length, spacing):
  """Fuselage, wings and tailplane (a cross), bright engines."""
  span = length * rng.uniform(0.85, 1.15)
  return [(0.0, 0.0, length / 2, max(length * 0.05, 0.5), 0.0),
          (0.05 * length, 0.0, 0.07 * length, span / 2, -1.0),
          (-0.42 * length, 0.0, 0.04 * length, span * 0.18, -1.0),
          (0.1 * length, 0.25 * span, 0.04 * length, 0.03 * span, 8.0),
          (0.1 * length, -0.25 * span, 0.04 * length, 0.03 * span, 8.0)], span


def _vehicle(rng, length, spacing):
  """A metal box: one bright rectangle."""
  width = max(rng.uniform(1.8, 2.6) / spacing, 0.4)
  return [(0.0, 0.0, length / 2, width / 2, 0.0)], width


def _tank(rng, diameter, spacing):
  """A round tank as concentric squares approximating its disc: roof, bright near-range rim."""
  r = diameter / 2
  rim = max(0.6, 1.5 / spacing)
  return [(0.0, 0.0, r * 0.7, r * 0.7, -10.0), (-r + rim / 2, 0.0, rim / 2, r * 0.8, 4.0),
          (r - rim / 2, 0.0, rim / 2, r * 0.8, 0.0), (0.0, r - rim / 2, r * 0.8, rim / 2, 0.0),
          (0.0, -r + rim / 2, r * 0.8, rim / 2, 0.0)], diameter


SHAPES = {"ship": _ship, "aircraft": _aircraft, "vehicle": _vehicle, "storage_tank": _tank}
# Per category: (mean extra count, max count, target sigma0 dB range, min host fraction in the box).
# Parts add their gain to the drawn sigma0 (a tank's rim +4 dB, its roof -10 dB).
PLACEMENT = {"ship": (2.0, 8, (4.0, 10.0), 0.9), "aircraft": (2.0, 6, (0.0, 6.0), 0.85),
             "vehicle": (4.0, 12, (2.0, 8.0), 0.4), "storage_tank": (4.0, 9, (6.0, 12.0), 1.0)}


def _host_mask(scene: _Scene, category: str) -> np.ndarray:
  """Where a target of `category` may stand."""
  lc = scene.landcover
  if category == "ship":
    return lc == WATER
  if category == "aircraft":
    return lc == RUNWAY
  if category == "vehicle":
    return lc == ROAD
  # Storage tanks: tank farms on cleared or grassed ground by the water; among buildings, whose
  # double bounce is as bright as a tank's rim, one would not be seen.
  water = lc == WATER
  near = ndimage.distance_transform_edt(~water) * scene.spacing < 250.0
  return near & ((lc == BARE_SOIL) | (lc == VEGETATION))


def _heading(rng: np.random.Generator, scene: _Scene, category: str, cx: float, cy: float) -> float:
  if category == "vehicle":
    road = scene.road_angle[int(cy), int(cx)]
    return float(road) + rng.choice((0.0, math.pi)) + rng.normal(0.0, 0.05)
  if category == "aircraft" and scene.airfield_angle is not None:
    return scene.airfield_angle + rng.integers(4) * math.pi / 2 + rng.normal(0.0, 0.1)
  if category == "storage_tank":
    return 0.0 if scene.look > 0 else math.pi  # the bright rim faces the sensor
  return rng.uniform(0.0, 2 * math.pi)


@dataclasses.dataclass(frozen=True)
class TargetTrace:
  """What a reported target's visibility was judged on (`simulate_chip_traced`).

  window: (y0, y1, x0, x1) of the pixels the target touches; cover, added: [y1 - y0, x1 - x0]
  fraction of each pixel inside its silhouette and linear sigma0 it adds; clutter: noise-free
  sigma0 [C, H, W] just before it was rendered (earlier targets, their side lobes and its own
  wake included).
  """
  instance: chip_lib.Instance
  window: tuple[int, int, int, int]
  cover: np.ndarray
  added: np.ndarray
  clutter: np.ndarray


def _place_targets(rng: np.random.Generator, scene: _Scene, imaging: chip_lib.Imaging,
                   sigma: np.ndarray, category: str,
                   trace: list[TargetTrace] | None = None) -> tuple[chip_lib.Instance, ...]:
  """Places and renders visible targets of `category` on their host surface; returns them.

  Each wanted target gets `PLACEMENT_TRIES` draws of size, brightness, position and heading; the
  first that fits the chip and its host, keeps clear of the others and is visible (longest box
  side `MIN_TARGET_PX`, silhouette `MIN_TARGET_AREA_PX`, `scr_db` >= `MIN_SCR_DB`) is rendered,
  else the target is dropped.
  """
  size, spacing = scene.size, scene.spacing
  host = _host_mask(scene, category)
  if not host.any():
    return ()
  table = np.pad(host.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
  candidates = np.flatnonzero(host)
  extra, most, db_range, min_fraction = PLACEMENT[category]
  wanted = min(1 + rng.poisson(extra), most)
  lo, hi = length_range_m(category, spacing, size)
  boxes: list[tuple[float, float, float, float]] = []
  water = scene.landcover == WATER
  for _ in range(wanted):
    for _ in range(PLACEMENT_TRIES):
      length = math.exp(rng.uniform(math.log(lo), math.log(hi))) / spacing
      parts, width = SHAPES[category](rng, length, spacing)
      cy, cx = divmod(int(candidates[rng.integers(candidates.size)]), size)
      cx, cy = cx + rng.random(), cy + rng.random()
      fp = _Footprint(parts, _heading(rng, scene, category, cx, cy))
      box = (cx + fp.extent[0], cy + fp.extent[1], cx + fp.extent[2], cy + fp.extent[3])
      if box[0] < 0 or box[1] < 0 or box[2] > size or box[3] > size:
        continue
      if max(box[2] - box[0], box[3] - box[1]) < MIN_TARGET_PX:
        continue
      if any(b[0] < box[2] + 1 and box[0] < b[2] + 1 and b[1] < box[3] + 1 and box[1] < b[3] + 1
             for b in boxes):
        continue
      ix0, iy0, ix1, iy1 = box_pixels(box, size)
      inside = table[iy1, ix1] - table[iy0, ix1] - table[iy1, ix0] + table[iy0, ix0]
      centre = host[int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)]
      if inside < min_fraction * (ix1 - ix0) * (iy1 - iy0) or not centre:
        continue
      window, cover, added = _rasterise(fp, cx, cy, rng.uniform(*db_range), size)
      if cover.sum() < MIN_TARGET_AREA_PX:
        continue
      clutter = sigma
      if category == "ship" and rng.random() < 0.5:
        clutter = sigma * _wake(rng, water, cx, cy, fp.angle, length, width)
      if scr_db(clutter, window, cover, added, box) < MIN_SCR_DB:
        continue
      if clutter is not sigma:  # the accepted ship's wake
        sigma[...] = clutter
      if trace is not None:
        instance = chip_lib.Instance(category, tuple(float(v) for v in box))
        trace.append(TargetTrace(instance, window, cover, added, sigma.copy()))
      y0, y1, x0, x1 = window
      sigma[:, y0:y1, x0:x1] += added
      peak = float(added.max())
      if peak > 10.0 ** 1.8:
        _side_lobes(sigma, cx, cy, peak)
      boxes.append(box)
      break
  return tuple(chip_lib.Instance(category, tuple(float(v) for v in b)) for b in boxes)


# ---------------------------------------------------------------------------------------------
# Acquisition


def _acquire(rng: np.random.Generator, sigma: np.ndarray, looks: int) -> np.ndarray:
  """Thermal noise and speckle on sigma [C, H, W]; dB image [H, W, C] float32, clipped."""
  intensity = (sigma + 10.0 ** (NESZ_DB / 10.0)) * rng.gamma(looks, 1.0 / looks, sigma.shape)
  db = 10.0 * np.log10(intensity)
  return np.clip(db, *DB_RANGE).transpose(1, 2, 0).astype(np.float32)
