"""The scene background of a simulated SAR chip (`klip.data.simulator`): land cover, relief and
mean backscatter, before targets, noise and speckle.

`Scene` lays out the land-cover mask of one chip from smooth random fields weighted by its city's
land-cover mix (water, built-up, vegetation, bare soil, mountain), with relief in the mountains,
roads and an airfield (runway and apron) drawn on top. `backscatter` turns it into noise-free
sigma0 per channel: a mean per class, band, polarisation and incidence (`class_sigma0_db`),
farmland parcels, built-up blocks with double-bounce lines along building rows, and the
foreshortening, layover and radar shadow of the relief seen from the look direction. `NESZ_DB`,
the noise floor, also serves the targets' visibility test and the final acquisition.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from klip.data import chip as chip_lib
from klip.data import knowledge

WATER, URBAN, VEGETATION, BARE_SOIL, MOUNTAIN, ROAD, RUNWAY = range(len(chip_lib.LANDCOVER_CLASSES))
NUM_AREA_CLASSES = 5  # water..mountain are laid out as regions; roads and runways are drawn on top
NESZ_DB = -30.0  # noise-equivalent sigma0: the floor seen in radar shadow

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


# ---------------------------------------------------------------------------------------------
# Scene layout


@functools.lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


class Scene:
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
    y, x = grid(self.size)
    width_px = max(rng.uniform(8.0, 25.0) / self.spacing, 1.0)
    angle = rng.uniform(0.0, math.pi)
    px, py = rng.uniform(0, self.size, 2)
    on = (_line_distance(x, y, px, py, angle) < width_px / 2) & (self.landcover != WATER)
    self.landcover[on] = ROAD
    self.road_angle[on] = angle

  def _airfield(self, rng: np.random.Generator):
    """A runway across the chip with a parallel apron, both paved (class runway)."""
    y, x = grid(self.size)
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


def _terrain_factor(scene: Scene, imaging: chip_lib.Imaging) -> np.ndarray:
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
  y, x = grid(size)
  u = (x * math.cos(angle) - y * math.sin(angle)) * spacing
  v = (x * math.sin(angle) + y * math.cos(angle)) * spacing
  pu, pv = rng.uniform(*period_m, 2)
  table = rng.normal(0.0, spread_db, 61)
  idx = (np.floor(u / pu).astype(np.int64) * 31 + np.floor(v / pv).astype(np.int64) * 17) % 61
  return table[idx], u, pu


def backscatter(rng: np.random.Generator, scene: Scene, imaging: chip_lib.Imaging) -> np.ndarray:
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

