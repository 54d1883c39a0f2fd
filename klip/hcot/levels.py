"""The five HCoT levels as requests: what each level reads, must conclude, and answers with.

`request(level, chip, previous)` builds the `LevelRequest` of one level; `REQUESTS` maps each of
`backend.LEVELS` to its builder. Facts are JSON types only: chip metadata, ground truth where known
(instances, land-cover shares, count) and knowledge-base lookups. The answer schemas use enums
wherever the knowledge base fixes the vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.hcot import backend
from klip.hcot import consistency
from klip.hcot import measure

PLACE_RADIUS_KM = 150.0
UNKNOWN = ("", "unknown", "na", "n/a", "none")
FUNCTIONS = knowledge.PLACE_FUNCTIONS + ("open sea", "unknown")
DISTRIBUTIONS = ("none", "single", "close pair", "distant pair", "line", "clustered", "scattered")
# Latitude bands (upper |lat| bound, zone, climate) for places far from every known place.
LATITUDE_BANDS = ((10.0, "equatorial", "tropical rainforest"),
                  (23.5, "tropical", "tropical wet and dry"),
                  (35.0, "subtropical", "subtropical"),
                  (55.0, "mid-latitude", "temperate"),
                  (66.5, "subpolar", "subarctic"),
                  (90.0, "polar", "polar"))

_TEXT = {"type": "string", "minLength": 1}
_STATEMENTS = {"type": "array", "items": _TEXT, "minItems": 1}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}


def known(value: str) -> str | None:
  """The value, or None when it is empty or says unknown."""
  return value.strip() if value and value.strip().lower() not in UNKNOWN else None


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
  """Great-circle distance."""
  p1, p2 = math.radians(lat1), math.radians(lat2)
  a = (math.sin((p2 - p1) / 2) ** 2
       + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
  return 2 * 6371.0 * math.asin(math.sqrt(min(1.0, a)))


def place_of(geo: chip_lib.Geo) -> tuple[knowledge.Place, float] | None:
  """The gazetteer place the chip names, else the nearest within PLACE_RADIUS_KM; with its
  distance (km) from the chip centre."""
  places = knowledge.gazetteer()
  named = [p for p in places if p.name == geo.city]
  if named:
    return named[0], distance_km(geo.lat, geo.lon, named[0].lat, named[0].lon)
  d, i = min((distance_km(geo.lat, geo.lon, p.lat, p.lon), i) for i, p in enumerate(places))
  return (places[i], d) if d <= PLACE_RADIUS_KM else None


def latitude_band(lat: float) -> dict[str, str]:
  for bound, zone, climate in LATITUDE_BANDS:
    if abs(lat) <= bound:
      return {"zone": zone, "climate": climate}
  raise ValueError(f"latitude {lat} out of range")


def _shares(chip: chip_lib.Chip) -> dict[str, float] | None:
  return None if chip.landcover is None else measure.fractions(chip.landcover)


def _place_facts(chip: chip_lib.Chip) -> dict[str, Any] | None:
  found = place_of(chip.geo)
  if found is None:
    return None
  p, d = found
  return {"name": p.name, "country": p.country, "distance_km": round(d, 1), "climate": p.climate,
          "terrain": p.terrain, "coastal": p.coastal, "setting": p.setting,
          "region_function": p.region_function}


def _request(chip: chip_lib.Chip, level: str, instructions: str, facts: dict[str, Any],
             previous: dict[str, dict[str, Any]], properties: dict[str, Any]
             ) -> backend.LevelRequest:
  schema = {"type": "object", "required": sorted(properties), "properties": properties,
            "additionalProperties": False}
  return backend.LevelRequest(chip_id=chip.id, level=level, instructions=instructions,
                              facts=facts, previous=dict(previous), schema=schema)


# ---------------------------------------------------------------------------------------------
# L1 geoscience


def geoscience(chip: chip_lib.Chip, previous: dict[str, dict[str, Any]]) -> backend.LevelRequest:
  """L1: climate zone, landform, coast or inland and the geographic setting from lat/lon."""
  g = chip.geo
  facts = {
      "location": {"lat": round(g.lat, 4), "lon": round(g.lon, 4)},
      "metadata": {"city": known(g.city), "country": known(g.country),
                   "climate": known(g.climate), "terrain": known(g.terrain)},
      "place": _place_facts(chip),
      "latitude_band": latitude_band(g.lat),
      "landcover": _shares(chip),
  }
  instructions = (
      "From the chip centre's latitude and longitude, conclude the geoscience of the scene: the "
      "climate zone, the landform, whether the scene is coastal or inland, and its geographic "
      "setting (river, estuary, bay, sea, plain or mountains). Prefer the metadata, then the "
      "nearest knowledge-base place (within 150 km), then the latitude-band rule; say which you "
      "used in climate_source. Use the land-cover shares, when given, to confirm water and relief.")
  props = {"place": _TEXT, "climate": _TEXT,
           "climate_source": {"enum": ["metadata", "knowledge base", "latitude band"]},
           "landform": _TEXT, "coast": {"enum": ["coastal", "inland", "unknown"]},
           "setting": _TEXT, "statements": _STATEMENTS}
  return _request(chip, "geoscience", instructions, facts, previous, props)


# ---------------------------------------------------------------------------------------------
# L2 society


def society(chip: chip_lib.Chip, previous: dict[str, dict[str, Any]]) -> backend.LevelRequest:
  """L2: the regional function (port, airport, urban core, farmland, industrial, ...)."""
  meta = known(chip.geo.region_function)
  place = _place_facts(chip)
  counts: dict[str, int] = {}
  for inst in chip.instances:
    counts[inst.category] = counts.get(inst.category, 0) + 1
  facts = {
      "metadata_function": meta if meta in FUNCTIONS else None,
      "place": place,
      "location": {"lat": round(chip.geo.lat, 4), "lon": round(chip.geo.lon, 4)},
      "landcover": _shares(chip),
      "instances": counts,
  }
  instructions = (
      "From the geoscience answer, the place and the scene content, conclude the social and "
      "regional function of the area (port, airport, urban core, farmland, industrial, military "
      "test range, open sea) and the human activity there. Prefer the metadata, then the "
      "knowledge-base place, then the land cover (runways mean an airport, dense built-up land an "
      "urban core, field parcels farmland), then the targets; name the region specifically "
      "(place, country, setting, or coordinates when no place is known).")
  props = {"function": {"enum": list(FUNCTIONS)},
           "function_source": {"enum": ["metadata", "knowledge base", "land cover", "instances",
                                        "none"]},
           "region": _TEXT, "activity": _TEXT, "statements": _STATEMENTS}
  return _request(chip, "society", instructions, facts, previous, props)


# ---------------------------------------------------------------------------------------------
# L3 physics


def _imaging_facts(chip: chip_lib.Chip) -> dict[str, Any]:
  im = chip.imaging
  platform = next((p for p in knowledge.platforms() if p.name == im.platform), None)
  look = {"ascending": "east", "descending": "west"}.get(im.orbit_direction)
  return {"platform": im.platform, "platform_known": platform is not None, "band": im.band,
          "wavelength_cm": platform.wavelength_cm if platform else None, "mode": im.mode,
          "polarisations": list(im.polarisations),
          "co_pol": [p for p in im.polarisations if p[0] == p[1]],
          "cross_pol": [p for p in im.polarisations if p[0] != p[1]],
          "pixel_spacing_m": im.pixel_spacing_m,
          "metres_per_pixel": round(measure.metres_per_pixel(chip), 3),
          "incidence_deg": im.incidence_deg, "depression_deg": round(90.0 - im.incidence_deg, 1),
          "orbit_direction": im.orbit_direction, "look_direction": look}


def _peak_db(chip: chip_lib.Chip, box: tuple[float, float, float, float]) -> float | None:
  h, w = chip.image_db.shape[:2]
  x0, y0 = min(max(int(box[0]), 0), w - 1), min(max(int(box[1]), 0), h - 1)
  x1, y1 = max(min(math.ceil(box[2]), w), x0 + 1), max(min(math.ceil(box[3]), h), y0 + 1)
  patch = chip.image_db[y0:y1, x0:x1, 0]
  return round(float(np.nanmax(patch)), 1) if np.isfinite(patch).any() else None


def shadow_m(chip: chip_lib.Chip, inst: chip_lib.Instance) -> float | None:
  """Ground length (m) of the radar shadow behind an instance of known height, else None."""
  sub = measure.subtype_of(inst)
  if sub is None or not math.isfinite(sub.height_m):
    return None
  return round(sub.height_m * math.tan(math.radians(chip.imaging.incidence_deg)), 1)


def physics(chip: chip_lib.Chip, previous: dict[str, dict[str, Any]]) -> backend.LevelRequest:
  """L3: scattering mechanisms from band, polarisation, incidence and the scene content."""
  rules = knowledge.scattering()
  shares = _shares(chip)
  surfaces = []
  if shares is not None:
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
      if share >= 0.02:
        r = rules.surfaces[name]
        surfaces.append({"name": name, "share": round(share, 3), "mechanisms": list(r.mechanisms),
                         "look": r.look, "cross_pol": r.cross_pol})
  targets: dict[str, dict[str, Any]] = {}
  for inst in chip.instances:
    r = rules.targets.get(inst.category)
    t = targets.setdefault(inst.category, {
        "category": inst.category, "count": 0, "mechanisms": list(r.mechanisms) if r else [],
        "look": r.look if r else None, "cross_pol": r.cross_pol if r else None,
        "moving": 0, "max_speed_kn": None, "peak_db": None, "shadow_m": None})
    t["count"] += 1
    if math.isfinite(inst.speed_kn) and inst.speed_kn > 0.5:
      t["moving"] += 1
      t["max_speed_kn"] = max(t["max_speed_kn"] or 0.0, round(inst.speed_kn, 1))
    peak = _peak_db(chip, inst.box)
    if peak is not None:
      t["peak_db"] = max(t["peak_db"] if t["peak_db"] is not None else -99.0, peak)
    t["shadow_m"] = shadow_m(chip, inst)
  facts = {
      "imaging": _imaging_facts(chip),
      "platform_problems": consistency.platform_problems(chip.imaging),
      "band_note": rules.bands.get(chip.imaging.band),
      "surfaces": surfaces if shares is not None else None,
      "mountain_share": None if shares is None else round(shares["mountain"], 3),
      "extent_m": round(chip.image_db.shape[1] * measure.metres_per_pixel(chip), 1),
      "targets": list(targets.values()),
  }
  instructions = (
      "From the band, polarisations, incidence and look direction, and from what the scene holds "
      "(the land-cover shares and targets, or the landform of the geoscience answer when no land "
      "cover is given and the chip spans at least a kilometre), name the scattering mechanisms "
      "the image shows and describe them: "
      "specular dark water, double bounce of buildings and hulls, volume scattering of canopies, "
      "foreshortening, layover and radar shadow on slopes facing and facing away from the radar, "
      "wakes of moving ships, side lobes of very strong scatterers (peak above +10 dB), the "
      "shadow cast behind a target away from the radar, and what cross-polarisation changes.")
  props = {"mechanisms": {"type": "array", "items": {"enum": list(knowledge.MECHANISMS)},
                          "uniqueItems": True},
           "sensor": _TEXT, "background": _TEXT, "target_look": {"type": ["string", "null"]},
           "statements": _STATEMENTS}
  return _request(chip, "physics", instructions, facts, previous, props)


# ---------------------------------------------------------------------------------------------
# L4 instances


def _spread(chip: chip_lib.Chip) -> dict[str, float] | None:
  """Nearest-neighbour gap (fraction of the chip width) and line-likeness of the centres."""
  if len(chip.instances) < 2:
    return None
  centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in
                      (i.box for i in chip.instances)])
  gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
  np.fill_diagonal(gaps, np.inf)
  eig = np.linalg.eigvalsh(np.cov(centres.T)) if len(centres) > 2 else np.array([1.0, 1.0])
  return {"mean_gap": round(float(gaps.min(axis=1).mean()) / chip.image_db.shape[1], 3),
          "line_ratio": round(float(eig[0] / max(eig[1], 1e-9)), 4)}


def _nan_to_none(x: float) -> float | None:
  return round(float(x), 2) if math.isfinite(x) else None


def instances(chip: chip_lib.Chip, previous: dict[str, dict[str, Any]]) -> backend.LevelRequest:
  """L4: which categories fit each object's size at this resolution; count and positions."""
  objects = knowledge.objects()
  h, w = chip.image_db.shape[:2]
  mpp = measure.metres_per_pixel(chip)
  shares = _shares(chip)
  rows = []
  for i, inst in enumerate(chip.instances):
    s = measure.size(chip, inst)
    sub = measure.subtype_of(inst)
    x0, y0, x1, y1 = inst.box
    cx, cy = min(int((x0 + x1) / 2), w - 1), min(int((y0 + y1) / 2), h - 1)
    rows.append({
        "index": i, "category": inst.category, "subtype": known(inst.subtype),
        "subtype_label": sub.label if sub else None,
        "subtype_description": sub.description if sub else None,
        "class_length_m": list(sub.length_m) if sub else None,
        "cell": chip_lib.GRID_NAMES[chip_lib.grid_cell(inst.box, h, w)],
        "length_px": round(max(x1 - x0, y1 - y0), 1), "width_px": round(min(x1 - x0, y1 - y0), 1),
        "box_length_m": round(s.box_length_m, 1), "box_width_m": round(s.box_width_m, 1),
        "ais_length_m": _nan_to_none(inst.length_m), "ais_width_m": _nan_to_none(inst.width_m),
        "length_m": _nan_to_none(s.length_m), "width_m": _nan_to_none(s.width_m),
        "size_source": s.source or None,
        "heading_deg": _nan_to_none(inst.heading_deg), "speed_kn": _nan_to_none(inst.speed_kn),
        "host": (None if chip.landcover is None
                 else chip_lib.LANDCOVER_CLASSES[chip.landcover[cy, cx]]),
    })
  facts = {
      "metres_per_pixel": round(mpp, 3), "chip_px": [h, w], "metadata_count": chip.count,
      "instances": rows, "spread": _spread(chip),
      "category_ranges": {n: {"length_m": list(c.length_m), "width_m": list(c.width_m),
                              "singular": c.singular, "plural": c.plural}
                          for n, c in objects.categories.items()},
      "fit_tolerance": measure.FIT_TOLERANCE,
      "landcover": shares,
  }
  instructions = (
      "For every object: an object of N pixels at R metres per pixel is N x R metres long; list "
      "the knowledge-base categories whose length range, widened by the fit_tolerance factor and "
      "half a pixel each way, holds that box length, and give its length and width, preferring "
      "a real measurement (AIS), then "
      "the known dimensions of its class, then the box. Give the count of targets (the annotated "
      "instances; the metadata count only when there are none; -1 when unknown), each object's "
      "3x3 grid cell, and the spatial distribution.")
  categories = sorted(set(objects.categories) | {i.category for i in chip.instances})
  item = {"type": "object", "additionalProperties": False,
          "required": ["index", "category", "label", "length_m", "width_m", "length_px", "cell",
                       "fits"],
          "properties": {"index": {"type": "integer", "minimum": 0},
                         "category": {"enum": categories}, "label": _TEXT,
                         "length_m": _OPTIONAL_NUMBER, "width_m": _OPTIONAL_NUMBER,
                         "length_px": {"type": "number", "minimum": 0},
                         "cell": {"enum": list(chip_lib.GRID_NAMES)},
                         "fits": {"type": "array", "items": {"enum": sorted(objects.categories)},
                                  "uniqueItems": True}}}
  props = {"count": {"type": "integer", "minimum": -1},
           "instances": {"type": "array", "items": item},
           "distribution": {"enum": list(DISTRIBUTIONS)}, "statements": _STATEMENTS}
  return _request(chip, "instances", instructions, facts, previous, props)


# ---------------------------------------------------------------------------------------------
# L5 consistency


def _cover_cells(chip: chip_lib.Chip, shares: dict[str, float]) -> dict[str, str]:
  h, w = chip.landcover.shape
  out = {}
  for name, share in shares.items():
    if share >= 0.05:
      ys, xs = np.nonzero(chip.landcover == chip_lib.LANDCOVER_CLASSES.index(name))
      cell = chip_lib.grid_cell((xs.mean(), ys.mean(), xs.mean() + 1, ys.mean() + 1), h, w)
      out[name] = chip_lib.GRID_NAMES[cell]
  return out


def _surroundings(chip: chip_lib.Chip) -> dict[str, float]:
  free = np.ones(chip.landcover.shape, bool)
  for b in (i.box for i in chip.instances):
    free[int(b[1]):math.ceil(b[3]), int(b[0]):math.ceil(b[2])] = False
  return measure.fractions(chip.landcover, free if free.any() else None)


def consistency_level(chip: chip_lib.Chip,
                      previous: dict[str, dict[str, Any]]) -> backend.LevelRequest:
  """L5: the final eight fields, with contradictions repaired or marked uncertain."""
  names = chip.field_names
  shares = _shares(chip)
  lc = chip.landcover
  facts = {
      "family": chip.family, "fields": list(names),
      "contradictions": [{"field": c.field, "reason": c.reason}
                         for c in consistency.contradictions(chip)],
      "hedge": consistency.HEDGE, "absent": consistency.ABSENT,
      "presence_fields": {k: list(v) for k, v in consistency.PRESENCE.items()},
      "physics_field": consistency.PHYSICS_FIELD[chip.family],
      "imaging": _imaging_facts(chip),
      "nouns": {n: [c.singular, c.plural] for n, c in knowledge.objects().categories.items()},
      "targets": [{"index": i, "heading_deg": _nan_to_none(inst.heading_deg),
                   "speed_kn": _nan_to_none(inst.speed_kn), "shadow_m": shadow_m(chip, inst)}
                  for i, inst in enumerate(chip.instances)],
      "landcover": shares,
      "surroundings": None if lc is None else _surroundings(chip),
      "cover_cells": None if lc is None else _cover_cells(chip, shares),
      "edge_density": None if lc is None else round(
          (np.count_nonzero(lc[1:] != lc[:-1]) + np.count_nonzero(lc[:, 1:] != lc[:, :-1]))
          / lc.shape[0], 3),
  }
  instructions = (
      f"Write the final values of the {chip.family} family's eight fields {list(names)} from the "
      "earlier answers, each a short specific phrase (no '$'). Cross-check the levels: repair a "
      "contradiction when the evidence settles it (the count is the number of annotated "
      "instances; a size comes from the trusted length) and record each repair; otherwise keep "
      f"the field but add the word '{consistency.HEDGE}' to it and list it in uncertain. A "
      f"presence field (water, buildings, roads) says '{consistency.ABSENT}' exactly when its "
      "land cover is zero. Name the band and polarisations in the physics field. List in generic "
      "the fields that had to fall back to a generic value because the metadata says nothing.")
  field_names = {"enum": list(names)}
  value = {"type": "string", "minLength": 1, "pattern": r"^[^$]*$"}
  props = {"values": {"type": "object", "required": list(names), "additionalProperties": False,
                      "properties": {n: value for n in names}},
           "repairs": {"type": "array", "items": _TEXT},
           "uncertain": {"type": "array", "items": field_names, "uniqueItems": True},
           "generic": {"type": "array", "items": field_names, "uniqueItems": True}}
  return _request(chip, "consistency", instructions, facts, previous, props)


REQUESTS: dict[str, Callable[[chip_lib.Chip, dict[str, dict[str, Any]]], backend.LevelRequest]] = {
    "geoscience": geoscience, "society": society, "physics": physics, "instances": instances,
    "consistency": consistency_level,
}
assert tuple(REQUESTS) == backend.LEVELS


def request(level: str, chip: chip_lib.Chip,
            previous: dict[str, dict[str, Any]]) -> backend.LevelRequest:
  """The request of `level` for `chip`, given the earlier levels' answers."""
  if level not in REQUESTS:
    raise ValueError(f"unknown level {level!r}, expected one of {backend.LEVELS}")
  return REQUESTS[level](chip, previous)
