"""The targets of a simulated SAR chip (`klip.data.simulator`): shapes, placement and visibility.

Targets stand where they belong (ships on water with wakes, aircraft on the airfield, vehicles on
roads, storage tanks on cleared ground by the water), sized in metres and converted with the pixel
spacing. Each is a `_Footprint` of bright rectangles in its own frame (`SHAPES`), rasterised with
partial-pixel coverage onto the noise-free sigma0 of the scene (`klip.data.simulator_scene`);
strong targets get a side-lobe cross.

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
import math

import numpy as np
from scipy import ndimage

from klip.data import chip as chip_lib
from klip.data import simulator_scene as scene_lib

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

# Real-world length range in metres of each target category.
TARGET_LENGTH_M = {"ship": (20.0, 300.0), "aircraft": (20.0, 70.0), "vehicle": (4.0, 12.0),
                   "storage_tank": (20.0, 80.0)}


def length_range_m(category: str, spacing: float, size: int) -> tuple[float, float] | None:
  """Lengths (m) of `category` that are resolvable at `spacing` and fit a `size` chip, or None."""
  lo, hi = TARGET_LENGTH_M[category]
  lo, hi = max(lo, MIN_TARGET_PX * spacing), min(hi, 0.6 * size * spacing)
  return (lo, hi) if lo <= hi else None


# ---------------------------------------------------------------------------------------------
# Footprints, visibility and placement


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
  floor = clutter + 10.0 ** (scene_lib.NESZ_DB / 10.0)
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
  y, x = scene_lib.grid(water.shape[0])
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


def _host_mask(scene: scene_lib.Scene, category: str) -> np.ndarray:
  """Where a target of `category` may stand."""
  lc = scene.landcover
  if category == "ship":
    return lc == scene_lib.WATER
  if category == "aircraft":
    return lc == scene_lib.RUNWAY
  if category == "vehicle":
    return lc == scene_lib.ROAD
  # Storage tanks: tank farms on cleared or grassed ground by the water; among buildings, whose
  # double bounce is as bright as a tank's rim, one would not be seen.
  water = lc == scene_lib.WATER
  near = ndimage.distance_transform_edt(~water) * scene.spacing < 250.0
  return near & ((lc == scene_lib.BARE_SOIL) | (lc == scene_lib.VEGETATION))


def _heading(rng: np.random.Generator, scene: scene_lib.Scene, category: str, cx: float,
             cy: float) -> float:
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
  """What a reported target's visibility was judged on (`simulator.simulate_chip_traced`).

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


def place_targets(rng: np.random.Generator, scene: scene_lib.Scene, imaging: chip_lib.Imaging,
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
  water = scene.landcover == scene_lib.WATER
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
