"""A physically motivated SAR scene simulator producing `chip.Chip`s with exact ground truth.

Each chip is a function of (index, seed, size, num_channels) only, drawn from
`np.random.default_rng([seed, index])`, so chips can be made in any order and in parallel:

1. a real city (`knowledge.cities()`), the scene of the chip;
2. a real platform, mode, polarisation pair, incidence and orbit direction
   (`knowledge.platforms()`);
3. a land-cover layout: smooth random fields weighted by the city's land-cover mix, relief in
   mountains, roads, runway and apron (`simulator_scene.Scene`);
4. mean backscatter (sigma0) per class, band, polarisation and incidence; double-bounce lines
   along building rows; foreshortening, layover and radar shadow from the relief and look direction
   (`simulator_scene.backscatter`);
5. targets where they belong (ships on water with wakes, aircraft on the airfield, vehicles on
   roads, storage tanks on cleared ground by the water), sized in metres and converted with the
   pixel spacing; strong targets get a side-lobe cross (`simulator_targets.place_targets`);
6. thermal noise and multiplicative speckle (Gamma with the mode's looks), then dB clipped to
   [-35, +15].

This module holds the entry points (`simulate`, `simulate_chip`, `simulate_chip_traced`), the
draws of city, acquisition and target category, and the final acquisition (noise and speckle).
The scene background (steps 3-4) lives in `klip.data.simulator_scene`, the targets (step 5) in
`klip.data.simulator_targets`, which also says when a target counts as visible and so is placed
and reported (`MIN_TARGET_PX`, `MIN_TARGET_AREA_PX`, `MIN_SCR_DB`).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
from typing import Iterable, Iterator

import numpy as np

from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data import simulator_scene as scene_lib
from klip.data import simulator_targets as targets_lib

DB_RANGE = (-35.0, 15.0)

# How likely each category is as the subject of a target chip, per regional function.
CATEGORY_WEIGHTS = {
    "port": {"ship": 0.6, "storage_tank": 0.25, "vehicle": 0.1, "aircraft": 0.05},
    "airport": {"aircraft": 0.7, "vehicle": 0.2, "ship": 0.05, "storage_tank": 0.05},
    "urban core": {"vehicle": 0.5, "ship": 0.2, "aircraft": 0.15, "storage_tank": 0.15},
    "farmland": {"vehicle": 0.5, "aircraft": 0.2, "ship": 0.15, "storage_tank": 0.15},
    "industrial": {"storage_tank": 0.45, "ship": 0.25, "vehicle": 0.2, "aircraft": 0.1},
}
# The land-cover weight a city needs for a category to occur there at all.
CATEGORY_HOST = {"ship": scene_lib.WATER, "aircraft": scene_lib.RUNWAY, "vehicle": scene_lib.ROAD,
                 "storage_tank": scene_lib.WATER}
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
                         ) -> tuple[chip_lib.Chip, list[targets_lib.TargetTrace]]:
  """`simulate_chip` and, per reported instance in order, what its visibility was judged on."""
  trace: list[targets_lib.TargetTrace] = []
  return _simulate(index, seed, size, num_channels, trace), trace


def _simulate(index: int, seed: int, size: int, num_channels: int,
              trace: list[targets_lib.TargetTrace] | None) -> chip_lib.Chip:
  if num_channels not in (1, 2):
    raise ValueError(f"num_channels must be 1 or 2, got {num_channels}")
  rng = np.random.default_rng([seed, index])
  city = _draw_city(rng)
  imaging, looks = _draw_imaging(rng, num_channels)
  category = _draw_category(rng, city, imaging.pixel_spacing_m, size)
  scene = scene_lib.Scene(rng, city, imaging, size, category)
  sigma = scene_lib.backscatter(rng, scene, imaging)
  instances = (targets_lib.place_targets(rng, scene, imaging, sigma, category, trace) if category
               else ())
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


def _draw_category(rng: np.random.Generator, city: knowledge.City, spacing: float,
                   size: int) -> str | None:
  """The target category of a target chip, or None for a landform chip."""
  weights = CATEGORY_WEIGHTS[city.region_function]
  feasible = [c for c in chip_lib.TARGET_CATEGORIES
              if city.landcover_weights[CATEGORY_HOST[c]] > 0
              and targets_lib.length_range_m(c, spacing, size)]
  if rng.random() >= TARGET_FAMILY_P or not feasible:
    return None
  p = np.array([weights[c] for c in feasible])
  return feasible[int(rng.choice(len(feasible), p=p / p.sum()))]


# ---------------------------------------------------------------------------------------------
# Acquisition


def _acquire(rng: np.random.Generator, sigma: np.ndarray, looks: int) -> np.ndarray:
  """Thermal noise and speckle on sigma [C, H, W]; dB image [H, W, C] float32, clipped."""
  intensity = ((sigma + 10.0 ** (scene_lib.NESZ_DB / 10.0))
               * rng.gamma(looks, 1.0 / looks, sigma.shape))
  db = 10.0 * np.log10(intensity)
  return np.clip(db, *DB_RANGE).transpose(1, 2, 0).astype(np.float32)
