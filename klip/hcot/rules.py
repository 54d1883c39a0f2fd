"""The `rules` backend: answers every HCoT level deterministically from the request alone.

Each level reads only `request.facts` and `request.previous`; the one free choice, the phrasing,
is drawn from a generator seeded with the chip id and level, so answers are reproducible.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

from klip.data import caption as caption_lib
from klip.hcot import backend

Answer = dict[str, Any]

COVER = {"water": "open water", "urban": "built-up land", "vegetation": "vegetation",
         "bare_soil": "bare soil", "mountain": "mountainous terrain", "road": "roads",
         "runway": "paved airfield"}
TERRAIN = {"water": "water surface", "urban": "built-up area", "vegetation": "vegetated land",
           "bare_soil": "open bare land", "mountain": "mountainous area", "road": "road corridor",
           "runway": "airfield"}
REGION = {"port": "port area", "airport": "airport area", "urban core": "urban core",
          "farmland": "farmland", "industrial": "industrial zone",
          "military test range": "military test range", "open sea": "open waters",
          "unknown": "area"}
FUNCTION = {"port": "port and shipping", "airport": "air transport",
            "urban core": "urban residential and commercial",
            "farmland": "agricultural production",
            "industrial": "industrial production and storage",
            "military test range": "military vehicle testing", "open sea": "maritime traffic",
            "unknown": "not resolved from the metadata"}
ACTIVITY = {"port": "berthing, cargo handling and ship traffic",
            "airport": "taxiing, parking and take-off of aircraft",
            "urban core": "dense residential and commercial life",
            "farmland": "crop cultivation in field parcels",
            "industrial": "industrial production and bulk storage",
            "military test range": "trials of military vehicles on open test ground",
            "open sea": "ships in transit and fishing", "unknown": "no known activity"}
# Category length (m) below which a target is small and above which it is large.
GRADE = {"ship": (60, 180), "aircraft": (30, 55), "vehicle": (6, 10), "storage_tank": (30, 60)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")
COMPASS = ("north", "north-northeast", "northeast", "east-northeast", "east", "east-southeast",
           "southeast", "south-southeast", "south", "south-southwest", "southwest",
           "west-southwest", "west", "west-northwest", "northwest", "north-northwest")
DISTRIBUTION = {"close pair": "a pair close together", "distant pair": "two targets far apart",
                "line": "in a line", "clustered": "clustered", "scattered": "scattered"}
RELIEF_WORDS = ("mountain", "hill", "alpine", "ridge", "plateau", "valley")
# A chip must span this much ground (m) for the place's landform to show slopes in it.
RELIEF_EXTENT_M = 1000.0


def coords(lat: float, lon: float) -> str:
  return f"{abs(lat):.2f}° {'N' if lat >= 0 else 'S'}, {abs(lon):.2f}° {'E' if lon >= 0 else 'W'}"


def metres(value: float) -> str:
  if value >= 20:
    return f"{max(5, round(value / 5) * 5)} m"
  return f"{value:.0f} m" if value >= 10 else f"{value:.1f} m"


def percent(share: float) -> str:
  return f"{max(1, round(100 * share))} %"


def ranked(shares: dict[str, float], minimum: float) -> list[str]:
  return [n for n, f in sorted(shares.items(), key=lambda kv: -kv[1]) if f >= minimum]


def joined(names: list[str]) -> str:
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class RulesBackend:
  """Deterministic, offline answers to every level."""

  name = "rules"

  def answer(self, request: backend.LevelRequest) -> Answer:
    rnd = random.Random(f"{request.chip_id}/{request.level}")
    return LEVEL_RULES[request.level](request.facts, request.previous, rnd)


# ---------------------------------------------------------------------------------------------
# L1 geoscience


def geoscience(f: Answer, prev: dict[str, Answer], rnd: random.Random) -> Answer:
  meta, place, band, lc = f["metadata"], f["place"], f["latitude_band"], f["landcover"]
  where = coords(f["location"]["lat"], f["location"]["lon"])
  if meta["climate"]:
    climate, source = meta["climate"], "metadata"
  elif place:
    climate, source = place["climate"], "knowledge base"
  else:
    climate, source = band["climate"], "latitude band"
  landform = meta["terrain"] or (place and place["terrain"])
  if not landform and lc:
    top = ranked(lc, 0.0)[0]
    landform = {"water": "open water", "mountain": "mountainous terrain",
                "urban": "built-up lowland"}.get(top, "lowland plain")
  landform = landform or "land of unknown relief"
  if place:
    coast = "coastal" if place["coastal"] else "inland"
  elif lc:
    coast = "coastal" if lc["water"] >= 0.1 else "inland"
  else:
    coast = "unknown"
  setting = place["setting"] if place else f"{band['zone']} latitudes at {where}"
  if place:
    name = f"{place['name']}, {place['country']}"
  elif meta["city"]:
    name = f"{meta['city']}, {meta['country']}" if meta["country"] else meta["city"]
  else:
    name = where
  statements = [f"The chip centre lies at {where}" + (
      f", {place['distance_km']:.0f} km from {place['name']}, {place['country']}." if place
      else ", beyond 150 km of every known place.")]
  statements.append(rnd.choice((f"The climate is {climate} (from the {source}).",
                                f"A {climate} climate holds here (from the {source}).")))
  statements.append(f"The landform is {landform}, on {setting}; the scene is {coast}.")
  return {"place": name, "climate": climate, "climate_source": source, "landform": landform,
          "coast": coast, "setting": setting, "statements": statements}


# ---------------------------------------------------------------------------------------------
# L2 society


def _function(f: Answer) -> tuple[str, str]:
  lc, counts = f["landcover"], f["instances"]
  if f["metadata_function"]:
    return f["metadata_function"], "metadata"
  if f["place"]:
    return f["place"]["region_function"], "knowledge base"
  if lc:
    if lc["runway"] >= 0.02:
      return "airport", "land cover"
    if lc["urban"] >= 0.4:
      return "urban core", "land cover"
    if lc["vegetation"] + lc["bare_soil"] >= 0.5:
      return "farmland", "land cover"
  for category, function in (("ship", "open sea"), ("aircraft", "airport"),
                             ("storage_tank", "industrial")):
    if counts.get(category):
      return function, "instances"
  return "unknown", "none"


def society(f: Answer, prev: dict[str, Answer], rnd: random.Random) -> Answer:
  function, source = _function(f)
  geo = prev["geoscience"]
  label = REGION[function]
  if f["place"]:
    region = rnd.choice((f"the {label} of {geo['place']}, near {geo['setting']}",
                         f"the {label} around {geo['place']}, near {geo['setting']}"))
  else:
    region = f"{label} at {coords(f['location']['lat'], f['location']['lon'])}"
  statements = [f"The regional function is {function} (from the {source}).",
                f"Typical activity: {ACTIVITY[function]}."]
  return {"function": function, "function_source": source, "region": region,
          "activity": ACTIVITY[function], "statements": statements}


# ---------------------------------------------------------------------------------------------
# L3 physics


def physics(f: Answer, prev: dict[str, Answer], rnd: random.Random) -> Answer:
  im = f["imaging"]
  pols = "/".join(im["polarisations"])
  angle = (f"{im['depression_deg']:g}° depression" if im["incidence_deg"] > 60
           else f"{im['incidence_deg']:g}° incidence")
  sensor = f"{im['band']}-band {pols} {im['platform']} {im['mode']} at {angle}"
  mechanisms: list[str] = []
  statements = [f"Imaged in {sensor}, {im['metres_per_pixel']:g} m per pixel."]
  if f["band_note"]:
    statements.append(f"At {im['band']}-band {f['band_note']}.")
  statements += [f"Platform check: {p}." for p in f["platform_problems"]]
  surfaces = f["surfaces"] or []
  for s in surfaces:
    if s["share"] >= 0.05:
      mechanisms += [m for m in s["mechanisms"] if m not in ("layover", "foreshortening",
                                                             "radar shadow")]
      cross = f"; {s['cross_pol']}" if im["cross_pol"] else ""
      statements.append(f"{COVER[s['name']].capitalize()} ({percent(s['share'])}) is "
                        f"{s['look']}{cross}.")
  landform = prev["geoscience"]["landform"].lower()
  relief = (f["mountain_share"] >= 0.05 if f["mountain_share"] is not None
            else f["extent_m"] >= RELIEF_EXTENT_M and any(w in landform for w in RELIEF_WORDS))
  if relief:
    mechanisms += ["foreshortening", "layover", "radar shadow"]
    facing = f"to the {im['look_direction']}" if im["look_direction"] else "towards the sensor"
    statements.append(
        f"Slopes facing the radar ({facing}) are foreshortened and bright, and those steeper "
        f"than the {im['incidence_deg']:g}° incidence lay over towards the sensor; slopes facing "
        "away fall into dark radar shadow" + (", common at so steep an incidence."
                                              if im["incidence_deg"] < 30 else "."))
  target_look = None
  for t in f["targets"]:
    if t["look"] is None:
      continue
    mechanisms += [m for m in t["mechanisms"] if m not in ("wake", "side lobes")]
    target_look = t["look"] if target_look is None else target_look
    statements.append(f"The {t['category'].replace('_', ' ')} targets show {t['look']}.")
    if im["cross_pol"]:
      statements.append(f"In {'/'.join(im['cross_pol'])} they are {t['cross_pol']}.")
    if t["peak_db"] is not None and t["peak_db"] >= 10.0:
      mechanisms.append("side lobes")
      statements.append(f"Peaks of {t['peak_db']:+.0f} dB spread side lobes as a bright cross "
                        "along range and azimuth.")
    if t["moving"]:
      mechanisms.append("wake")
      statements.append(f"{t['moving']} moving at up to {t['max_speed_kn']:g} kn leave a dark "
                        "turbulent wake with bright Kelvin arms.")
    if t["shadow_m"]:
      mechanisms.append("radar shadow")
      statements.append(f"At {angle} a target casts a radar shadow about {t['shadow_m']:g} m "
                        "long behind it, away from the radar.")
  background = (f"{COVER[surfaces[0]['name']]} that is {surfaces[0]['look']}" if surfaces
                else prev["geoscience"]["landform"])
  return {"mechanisms": list(dict.fromkeys(mechanisms)), "sensor": sensor,
          "background": background, "target_look": target_look, "statements": statements}


# ---------------------------------------------------------------------------------------------
# L4 instances


def _fits(box_length: float, f: Answer) -> list[str]:
  mpp, tol = f["metres_per_pixel"], f["fit_tolerance"]
  return sorted(c for c, r in f["category_ranges"].items()
                if r["length_m"][0] / tol - mpp / 2 <= box_length
                <= r["length_m"][1] * tol + mpp / 2)


def _distribution(f: Answer) -> str:
  n, spread = len(f["instances"]), f["spread"]
  if n == 0:
    return "none"
  if n == 1:
    return "single"
  close = spread["mean_gap"] < 0.2
  if n == 2:
    return "close pair" if close else "distant pair"
  if spread["line_ratio"] < 0.02:
    return "line"
  return "clustered" if close else "scattered"


def instances(f: Answer, prev: dict[str, Answer], rnd: random.Random) -> Answer:
  mpp = f["metres_per_pixel"]
  rows, statements = [], []
  for inst in f["instances"]:
    fits = _fits(inst["box_length_m"], f)
    label = inst["subtype_label"] or f["category_ranges"].get(
        inst["category"], {"singular": inst["category"]})["singular"]
    rows.append({"index": inst["index"], "category": inst["category"], "label": label,
                 "length_m": inst["length_m"], "width_m": inst["width_m"],
                 "length_px": inst["length_px"], "cell": inst["cell"], "fits": fits})
    known = (f"; the {inst['size_source']} length is {inst['length_m']:g} m"
             if inst["length_m"] is not None else "; no plausible length is known")
    statements.append(f"Object {inst['index']}: {inst['length_px']:g} px at {mpp:g} m per pixel "
                      f"is {inst['box_length_m']:g} m, which fits {', '.join(fits) or 'nothing'}"
                      f"{known}; a {label} at the {inst['cell']}.")
  count = len(rows) if rows else f["metadata_count"]
  statements.append(f"Count: {count}." if count >= 0 else "The count is unknown.")
  return {"count": count, "instances": rows, "distribution": _distribution(f),
          "statements": statements}


# ---------------------------------------------------------------------------------------------
# L5 consistency: the final fields


class _Fields:
  """Builds the eight field values and keeps the repairs, uncertain and generic fields."""

  def __init__(self, f: Answer, prev: dict[str, Answer], rnd: random.Random):
    self.f, self.prev, self.rnd = f, prev, rnd
    self.geo, self.soc, self.phys = prev["geoscience"], prev["society"], prev["physics"]
    self.inst = prev["instances"]
    self.im = f["imaging"]
    self.pols = "/".join(self.im["polarisations"])
    self.repairs: list[str] = []
    self.generic: list[str] = []

  def generic_value(self, field: str) -> str:
    self.generic.append(field)
    return caption_lib.GENERIC

  # target family

  def target(self) -> dict[str, str]:
    rows = self.inst["instances"]
    return {"count": self.count(rows), "location": self.location(rows),
            "feature": self.feature(rows), "size": self.size(rows),
            "category": self.category(rows), "distribution": self.distribution(rows),
            "region": self.soc["region"], "environment": self.environment(rows)}

  def main_category(self, rows: list[Answer]) -> str | None:
    cats = [r["category"] for r in rows]
    return max(sorted(set(cats)), key=cats.count) if cats else None

  def noun(self, category: str | None, n: int) -> str:
    singular, plural = self.f["nouns"].get(category, ["target", "targets"])
    return singular if n == 1 else plural

  def count(self, rows: list[Answer]) -> str:
    n = self.inst["count"]
    if n < 0:
      return self.generic_value("count")
    noun = self.noun(self.main_category(rows), n)
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return self.rnd.choice((str(n), f"{word} {noun}", f"{n} {noun}"))

  def location(self, rows: list[Answer]) -> str:
    if not rows:
      return self.generic_value("location")
    cells = [r["cell"] for r in rows]
    unique = sorted(set(cells), key=cells.index)
    if len(unique) > 4:
      main = max(unique, key=cells.count)
      return f"several parts of the image, most of them at the {main}"
    return f"the {joined(unique)} of the image"

  def feature(self, rows: list[Answer]) -> str:
    look = self.phys["target_look"]
    if look is None:
      return f"{self.phys['background']}, in {self.im['band']}-band {self.pols}"
    parts = [f"{look} in {self.im['band']}-band {self.pols}"]
    if self.im["cross_pol"] and self.im["co_pol"]:
      parts.append(f"weaker in {'/'.join(self.im['cross_pol'])}")
    mech = self.phys["mechanisms"]
    if "side lobes" in mech:
      parts.append("with side-lobe crosses from the strongest points")
    if "wake" in mech:
      parts.append("trailing a wake")
    shadows = [t["shadow_m"] for t in self.f["targets"] if t["shadow_m"]]
    if shadows:
      parts.append(f"with a {max(shadows):g} m radar shadow cast away from the radar")
    return ", ".join(parts)

  def size(self, rows: list[Answer]) -> str | None:
    """None when a target has no plausible length."""
    mpp = self.f["imaging"]["metres_per_pixel"]
    if not rows:
      return self.generic_value("size")
    lengths = [r["length_m"] for r in rows]
    if any(v is None for v in lengths):
      return None
    if len(rows) == 1:
      r = rows[0]
      width = f" and {metres(r['width_m'])} wide" if r["width_m"] else ""
      pixels = r["length_m"] / mpp
      return self.rnd.choice((
          f"about {metres(r['length_m'])} long{width}, {pixels:.0f} pixels at {mpp:g} m per pixel",
          f"{metres(r['length_m'])} long{width}, spanning {pixels:.0f} pixels at {mpp:g} m per "
          "pixel"))
    lo, hi = metres(min(lengths)), metres(max(lengths))
    if lo == hi:
      return f"about {lo} long each at {mpp:g} m per pixel"
    return f"from about {lo} to {hi} long at {mpp:g} m per pixel"

  def category(self, rows: list[Answer]) -> str:
    if not rows:
      return self.generic_value("category")
    main = self.main_category(rows)
    labels = sorted({r["label"] for r in rows if r["label"] != self.noun(r["category"], 1)})
    if len(rows) == 1:
      if labels:
        return labels[0]
      return self.grade(main, rows) + self.noun(main, 1)
    names = [self.noun(c, 2) for c in sorted({r["category"] for r in rows})]
    text = self.grade(main, rows) + joined(names) if len(names) == 1 else joined(names)
    return text + (f", including {joined(labels)}" if labels else "")

  def grade(self, category: str, rows: list[Answer]) -> str:
    longest = max((r["length_m"] or 0.0) for r in rows)
    lo, hi = GRADE.get(category, (0.0, math.inf))
    return "small " if longest < lo else "large " if longest > hi else ""

  def distribution(self, rows: list[Answer]) -> str:
    kind = self.inst["distribution"]
    if kind == "none":
      return self.generic_value("distribution")
    if kind != "single":
      return DISTRIBUTION[kind]
    motion = self.f["targets"][0]
    label = rows[0]["label"]
    if motion["speed_kn"] is not None and motion["speed_kn"] > 0.5:
      heading = (f" heading {COMPASS[round(motion['heading_deg'] / 22.5) % 16]}"
                 if motion["heading_deg"] is not None else "")
      return f"a single {label} under way{heading} at {motion['speed_kn']:g} kn"
    if motion["speed_kn"] is not None:
      return f"a single {label}, stationary"
    return self.rnd.choice(("a single isolated target", f"one {label} alone in the scene"))

  def environment(self, rows: list[Answer]) -> str:
    climate = f"in a {self.geo['climate']} climate"
    around = self.f["surroundings"]
    if around is not None:
      top = ranked(around, 0.1)[:2] or ranked(around, 0.0)[:1]
      text = COVER[top[0]] + (f" with some {COVER[top[1]]}" if len(top) > 1 else "")
      return f"{text}, {climate}"
    main = self.main_category(rows)
    if main == "ship":
      setting = "" if self.geo["coast"] == "unknown" else f" in a {self.geo['coast']} setting"
      return f"open water around the {self.noun('ship', len(rows))}{setting}, {climate}"
    if main == "vehicle" and self.soc["function"] == "military test range":
      return f"a grass field with low clutter, {climate}"
    return f"{self.geo['landform']}, {climate}"

  # landform family

  def landform(self) -> dict[str, str]:
    shares = self.f["landcover"]
    place = self.geo["place"]
    function = FUNCTION[self.soc["function"]]
    if self.soc["function"] == "unknown":
      function = self.generic_value("functionality")
    if shares is None:
      return {"terrain": f"{self.geo['landform']} of {place}", "functionality": function,
              **{k: self.generic_value(k) for k in ("distribution", "layout", "boundary",
                                                    "buildings", "roads", "water")}}
    top = ranked(shares, 0.05)
    where = self.rnd.choice(("within", "on", "in"))
    if shares["runway"] > 0 and self.soc["function"] != "unknown":
      function += " with an airfield"
    return {"terrain": f"{TERRAIN[top[0]]} {where} the {self.geo['landform']} of {place}",
            "functionality": function, "distribution": self.mix(shares, top),
            "layout": self.layout(top), "boundary": self.boundary(top),
            "buildings": self.buildings(shares["urban"]),
            "roads": self.roads(shares["road"], shares["runway"]),
            "water": self.water(shares["water"])}

  def mix(self, shares: dict[str, float], top: list[str]) -> str:
    if shares[top[0]] >= 0.8 or len(top) == 1:
      return f"almost uniformly {COVER[top[0]]} ({percent(shares[top[0]])})"
    parts = [f"{COVER[n]} ({percent(shares[n])})" for n in top[:3]]
    return f"{parts[0]} mixed with " + " and ".join(parts[1:])

  def layout(self, top: list[str]) -> str:
    cells = self.f["cover_cells"]
    if len(top) == 1:
      return f"a single continuous region of {COVER[top[0]]}"
    return " and ".join(f"{COVER[n]} towards the {cells[n]}" for n in top[:2])

  def boundary(self, top: list[str]) -> str:
    density = self.f["edge_density"]
    sensor = f"in {self.im['band']}-band {self.pols}"
    if density == 0:
      return f"absent, as the scene is one cover type {sensor}"
    shape = "few and smooth" if density <= 1.5 else "irregular" if density <= 4 else "fragmented"
    if len(top) < 2:
      return f"{shape}, around small patches in {COVER[top[0]]} {sensor}"
    return f"{shape}, mainly between {COVER[top[0]]} and {COVER[top[1]]}, contrasted {sensor}"

  def buildings(self, urban: float) -> str:
    if urban == 0:
      return "absent"
    if urban < 0.1:
      return "sparse, in small scattered patches with isolated bright double-bounce points"
    density = "moderately dense" if urban < 0.4 else "dense"
    return (f"{density} blocks covering about {percent(urban)} of the image with bright "
            "double-bounce lines along the building rows")

  def roads(self, road: float, runway: float) -> str:
    parts = []
    if road > 0:
      parts.append("a few narrow dark linear roads" if road < 0.05
                   else "a network of dark linear roads")
    if runway > 0:
      parts.append("a wide dark runway with a parallel apron")
    return " and ".join(parts) if parts else "absent"

  def water(self, water: float) -> str:
    if water == 0:
      return "absent"
    if water < 0.1:
      return "small dark patches of calm water"
    extent = "a dark water body" if water < 0.5 else "a large dark water surface"
    return (f"{extent} covering about {percent(water)} of the image, specular at "
            f"{self.im['incidence_deg']:g}° incidence")


def consistency(f: Answer, prev: dict[str, Answer], rnd: random.Random) -> Answer:
  build = _Fields(f, prev, rnd)
  values = build.target() if f["family"] == "target" else build.landform()
  uncertain: list[str] = []
  for c in f["contradictions"]:
    field, reason = c["field"], c["reason"]
    if field == "count" and values["count"] != caption_lib.GENERIC:
      build.repairs.append(f"count: {reason}; stated {prev['instances']['count']}")
    elif field == "size" and values["size"] is not None:
      build.repairs.append(f"size: {reason}; stated the trusted length")
    elif field not in uncertain:
      uncertain.append(field)
  if "size" in values and values["size"] is None:
    values["size"] = "no plausible size is known"
    if "size" not in uncertain:
      uncertain.append("size")
  for field in uncertain:
    reasons = "; ".join(c["reason"] for c in f["contradictions"] if c["field"] == field)
    values[field] = f"{values[field]} ({f['hedge']}: {reasons or 'conflicting evidence'})"
  return {"values": values, "repairs": build.repairs, "uncertain": uncertain,
          "generic": build.generic}


LEVEL_RULES: dict[str, Callable[[Answer, dict[str, Answer], random.Random], Answer]] = {
    "geoscience": geoscience, "society": society, "physics": physics, "instances": instances,
    "consistency": consistency,
}
