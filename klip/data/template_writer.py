"""Template writer: the eight field values of a simulated chip, from its metadata and ground truth.

A simple, truthful stand-in for the HCoT generator: every value is read off the chip (instances,
land-cover mask, imaging and geographic metadata) and phrased with small templates, varied
deterministically per chip id.
"""

from __future__ import annotations

import random

import numpy as np

from klip.data import chip as chip_lib
from klip.data import text

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")
SINGULAR = {"ship": "ship", "aircraft": "aircraft", "vehicle": "vehicle",
            "storage_tank": "storage tank"}
PLURAL = {"ship": "ships", "aircraft": "aircraft", "vehicle": "vehicles",
          "storage_tank": "storage tanks"}
LOOK = {"ship": "elongated returns against dark specular water",
        "aircraft": "cross-shaped returns from fuselage and wings on the dark paved airfield",
        "vehicle": "small point-like returns along dark smooth roads",
        "storage_tank": "ring-shaped returns from the tank walls with a brighter near-range rim"}
COVER = {"water": "open water", "urban": "built-up land", "vegetation": "vegetation",
         "bare_soil": "bare soil", "mountain": "mountainous terrain", "road": "roads",
         "runway": "paved airfield"}
TERRAIN = {"water": "water surface", "urban": "built-up area", "vegetation": "vegetated land",
           "bare_soil": "open bare land", "mountain": "mountainous area", "road": "road corridor",
           "runway": "airfield"}
FUNCTION = {"port": "port and shipping", "airport": "air transport",
            "urban core": "urban residential and commercial", "farmland": "agricultural production",
            "industrial": "industrial production and storage"}
REGION = {"port": "port area", "airport": "airport area", "urban core": "urban core",
          "farmland": "farmland", "industrial": "industrial zone"}


def write_fields(chip: chip_lib.Chip) -> tuple[str, ...]:
  """The eight field values of `chip`, in the order of `chip.field_names`.

  Needs the chip's land-cover mask, and instances for a target chip.
  """
  if chip.landcover is None:
    raise ValueError(f"chip {chip.id} has no land-cover ground truth to describe")
  rnd = random.Random(chip.id)
  if chip.family == "target":
    if not chip.instances:
      raise ValueError(f"target chip {chip.id} has no instances to describe")
    return _target_fields(chip, rnd)
  return _landform_fields(chip, rnd)


def caption(chip: chip_lib.Chip) -> text.StructuredText:
  """The structured caption of `chip`."""
  return text.compose(chip.family, write_fields(chip))


def _fractions(landcover: np.ndarray, keep: np.ndarray | None = None) -> dict[str, float]:
  """Share of each land-cover class, over the pixels where `keep` is true (all by default)."""
  ids = landcover if keep is None else landcover[keep]
  counts = np.bincount(ids.ravel(), minlength=len(chip_lib.LANDCOVER_CLASSES))
  total = max(int(counts.sum()), 1)
  return {name: counts[i] / total for i, name in enumerate(chip_lib.LANDCOVER_CLASSES)}


def _ranked(fractions: dict[str, float], minimum: float) -> list[str]:
  return [n for n, f in sorted(fractions.items(), key=lambda kv: -kv[1]) if f >= minimum]


def _metres(value: float) -> str:
  step = 5 if value >= 20 else 1
  return f"{max(step, round(value / step) * step)} m"


# ---------------------------------------------------------------------------------------------
# Target family


def _target_fields(chip: chip_lib.Chip, rnd: random.Random) -> tuple[str, ...]:
  category = chip.instances[0].category
  return (_count(chip.count, category, rnd), _location(chip), _feature(chip, category),
          _size(chip), _category(chip, category), _distribution(chip), _region(chip.geo, rnd),
          _environment(chip))


def _count(n: int, category: str, rnd: random.Random) -> str:
  word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
  noun = SINGULAR[category] if n == 1 else PLURAL[category]
  return rnd.choice((str(n), f"{word} {noun}", f"{n} {noun}"))


def _location(chip: chip_lib.Chip) -> str:
  h, w = chip.landcover.shape
  cells = [chip_lib.grid_cell(i.box, h, w) for i in chip.instances]
  unique = sorted(set(cells))
  if len(unique) > 4:
    main = max(unique, key=cells.count)
    return f"several parts of the image, most of them at the {chip_lib.GRID_NAMES[main]}"
  names = [chip_lib.GRID_NAMES[c] for c in unique]
  joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return f"the {joined} of the image"


def _feature(chip: chip_lib.Chip, category: str) -> str:
  peak = max(float(chip.image_db[int(b[1]):int(np.ceil(b[3])), int(b[0]):int(np.ceil(b[2])),
                                 0].max()) for b in (i.box for i in chip.instances))
  strength = "very strong" if peak >= 10.0 else "strong" if peak >= 0.0 else "moderate"
  pols = "/".join(chip.imaging.polarisations)
  return f"{strength} {LOOK[category]} in {chip.imaging.band}-band {pols}"


def _extents(chip: chip_lib.Chip) -> list[float]:
  spacing = chip.imaging.pixel_spacing_m
  return [max(b[2] - b[0], b[3] - b[1]) * spacing for b in (i.box for i in chip.instances)]


def _size(chip: chip_lib.Chip) -> str:
  spacing = chip.imaging.pixel_spacing_m
  if len(chip.instances) == 1:
    x0, y0, x1, y1 = chip.instances[0].box
    return (f"about {_metres(_extents(chip)[0])} across, {x1 - x0:.0f} by {y1 - y0:.0f} pixels "
            f"at {spacing:g} m per pixel")
  ext = _extents(chip)
  if _metres(min(ext)) == _metres(max(ext)):
    return f"about {_metres(ext[0])} across each at {spacing:g} m per pixel"
  return f"from about {_metres(min(ext))} to {_metres(max(ext))} across at {spacing:g} m per pixel"


def _category(chip: chip_lib.Chip, category: str) -> str:
  largest = max(_extents(chip))
  lo, hi = {"ship": (60, 180), "aircraft": (30, 55), "vehicle": (6, 10),
            "storage_tank": (30, 60)}[category]
  grade = "small " if largest < lo else "large " if largest > hi else ""
  return grade + PLURAL[category]


def _distribution(chip: chip_lib.Chip) -> str:
  centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in
                      (i.box for i in chip.instances)])
  size = chip.landcover.shape[0]
  if len(centres) == 1:
    return "a single isolated target"
  gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
  np.fill_diagonal(gaps, np.inf)
  close = gaps.min(axis=1).mean() < 0.2 * size
  if len(centres) == 2:
    return "a pair close together" if close else "two targets far apart"
  spread = np.linalg.eigvalsh(np.cov(centres.T))
  if spread[0] < 0.02 * spread[1]:
    return "in a line"
  return "clustered" if close else "scattered"


def _region(geo: chip_lib.Geo, rnd: random.Random) -> str:
  return rnd.choice((f"the {REGION[geo.region_function]} of {geo.city}, {geo.country}",
                     f"{REGION[geo.region_function]} around {geo.city}, {geo.country}"))


def _environment(chip: chip_lib.Chip) -> str:
  free = np.ones(chip.landcover.shape, bool)
  for b in (i.box for i in chip.instances):
    free[int(b[1]):int(np.ceil(b[3])), int(b[0]):int(np.ceil(b[2]))] = False
  ranked = _ranked(_fractions(chip.landcover, free), 0.1)
  ranked = (ranked or _ranked(_fractions(chip.landcover), 0.1))[:2]
  around = COVER[ranked[0]] + (f" with some {COVER[ranked[1]]}" if len(ranked) > 1 else "")
  return f"{around}, in a {chip.geo.climate} climate"


# ---------------------------------------------------------------------------------------------
# Landform family


def _landform_fields(chip: chip_lib.Chip, rnd: random.Random) -> tuple[str, ...]:
  lc = chip.landcover
  fractions = _fractions(lc)
  ranked = _ranked(fractions, 0.05)
  where = rnd.choice(("within", "on", "in"))
  terrain = f"{TERRAIN[ranked[0]]} {where} the {chip.geo.terrain} of {chip.geo.city}"
  function = FUNCTION[chip.geo.region_function]
  if fractions["runway"] > 0:
    function += " with an airfield"
  return (terrain, function, _cover_mix(fractions, ranked), _layout(lc, ranked),
          _boundary(lc, ranked), _buildings(fractions["urban"]),
          _roads(fractions["road"], fractions["runway"]), _water(fractions["water"]))


def _percent(f: float) -> str:
  return f"{max(1, round(100 * f))} %"


def _cover_mix(fractions: dict[str, float], ranked: list[str]) -> str:
  if fractions[ranked[0]] >= 0.8 or len(ranked) == 1:
    return f"almost uniformly {COVER[ranked[0]]} ({_percent(fractions[ranked[0]])})"
  parts = [f"{COVER[n]} ({_percent(fractions[n])})" for n in ranked[:3]]
  return f"{parts[0]} mixed with " + " and ".join(parts[1:])


def _layout(lc: np.ndarray, ranked: list[str]) -> str:
  h, w = lc.shape
  if len(ranked) == 1:
    return f"a single continuous region of {COVER[ranked[0]]}"
  places = []
  for name in ranked[:2]:
    ys, xs = np.nonzero(lc == chip_lib.LANDCOVER_CLASSES.index(name))
    cell = chip_lib.grid_cell((xs.mean(), ys.mean(), xs.mean() + 1, ys.mean() + 1), h, w)
    places.append(f"{COVER[name]} towards the {chip_lib.GRID_NAMES[cell]}")
  return " and ".join(places)


def _boundary(lc: np.ndarray, ranked: list[str]) -> str:
  edges = np.count_nonzero(lc[1:] != lc[:-1]) + np.count_nonzero(lc[:, 1:] != lc[:, :-1])
  density = edges / lc.shape[0]
  if density == 0:
    return "absent, as the scene is one cover type"
  shape = "few and smooth" if density <= 1.5 else "irregular" if density <= 4 else "fragmented"
  if len(ranked) < 2:
    return f"{shape}, around small patches in {COVER[ranked[0]]}"
  return f"{shape}, mainly between {COVER[ranked[0]]} and {COVER[ranked[1]]}"


def _buildings(urban: float) -> str:
  if urban == 0:
    return "absent"
  if urban < 0.1:
    return "sparse, in small scattered patches"
  density = "moderately dense" if urban < 0.4 else "dense"
  return (f"{density} blocks covering about {_percent(urban)} of the image with bright "
          "double-bounce lines along the building rows")


def _roads(road: float, runway: float) -> str:
  parts = []
  if road > 0:
    parts.append("a few narrow dark linear roads" if road < 0.05
                 else "a network of dark linear roads")
  if runway > 0:
    parts.append("a wide dark runway with a parallel apron")
  return " and ".join(parts) if parts else "not visible"


def _water(water: float) -> str:
  if water == 0:
    return "absent"
  if water < 0.1:
    return "small dark patches of calm water"
  extent = "a dark water body" if water < 0.5 else "a large dark water surface"
  return f"{extent} covering about {_percent(water)} of the image"
