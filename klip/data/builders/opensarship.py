"""OpenSARShip: Sentinel-1 IW ship chips with AIS-matched metadata, one chip per ship.

    python -m klip.data.prepare --dataset=opensarship --source=../shared/data/opensarship

Layout: one folder per scene named after the Sentinel-1 product (S1A_IW_GRDH_1SDV_...), holding
`Ship.xml` (SAR, AIS and MarineTraffic fields per ship), a scene metadata XML (`<scene>.xml` or
`Metedata.xml`, SNAP abstracted metadata: pass, range/azimuth spacing) and `Patch_Cal/`
(calibrated sigma0, linear power, float32; channel 0 = VH, 1 = VV per the archive's ReadMe).
Chip files are `<AIS type>_x<Center_x>_y<Center_y>.tif`, matched to ships by centre pixel.

Quirks handled: scenes nested one folder deeper (any depth is searched for `Ship.xml`; the
scene id is the nearest enclosing folder named like a product); images are decoded by content,
not extension (`.tif` files that are PNG); `Ship.xml` that is not strict XML (e.g. a `<\\ShipList>`
closing tag) is read by a tolerant per-`<ship>` parse.

Images: 10 log10(sigma0) dB, channels reordered co-pol first (VV, VH; VV alone for 1SSV).
Pixel spacing: GRD from the scene metadata (10 m); SLC chips are in slant-range geometry, so
ground range = range spacing / sin(incidence) and azimuth spacing differ: the box uses both,
`pixel_spacing_m` records their geometric mean (area-equivalent spacing) rounded to 0.1 m.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Container, Iterator

import tensorflow_datasets as tfds

from klip.data import chip as chip_lib
from klip.data.builders import archive
from klip.data.builders import sources

VERSION = "1.0.0"
_SCENE = re.compile(r"S1[AB]_(IW|EW|SM|WV)_(GRD[HMF]|SLC_)_1S([SD])([HV])_\d{8}T\d{6}_")
_CHIP_FILE = re.compile(r"(.+)_x(\d+)_y(\d+)\.(tif|tiff|png)", re.I)
_ATTRIB = re.compile(r'<attrib\s+name="(\w+)"\s+value="([^"]*)"')
_LEAF = re.compile(r"<(\w+)>([^<]*)</\1>")
_AIS_TYPES = {30: "Fishing", 31: "Towing", 32: "Towing", 33: "Dredging", 34: "Diving ops",
              35: "Military ops", 36: "Sailing", 37: "Pleasure craft", 50: "Pilot vessel",
              51: "Search and rescue", 52: "Tug", 53: "Port tender", 54: "Anti-pollution",
              55: "Law enforcement", 58: "Medical transport"}
_AIS_RANGES = ((20, 29, "Wing in ground"), (40, 49, "High speed craft"), (60, 69, "Passenger"),
               (70, 79, "Cargo"), (80, 89, "Tanker"), (90, 99, "Other type"))
_BEAM_RATIO = 0.15  # typical beam / length of a merchant ship, for a box when the beam is unknown


def ais_type_name(code: int) -> str:
  """The ITU-R M.1371 ship-type name of an AIS type code ("" for 0 = not available and for the
  reserved codes 1-19 and 100-255)."""
  if code in _AIS_TYPES:
    return _AIS_TYPES[code]
  return next((name for lo, hi, name in _AIS_RANGES if lo <= code <= hi), "")


def read_ship_xml(path: str) -> list[dict[str, str] | str]:
  """Per `<ship>` record of a Ship.xml: {leaf tag: text}, or a problem string when the record
  is truncated. Strict XML first; files that are not strict XML are cut at `<ship>` tags and
  their leaf elements read by pattern."""
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  try:
    root = ET.fromstring(text)
    return [{e.tag: (e.text or "").strip() for e in ship.iter() if not len(e)}
            for ship in root.iter("ship")]
  except ET.ParseError:
    pass
  out = []
  for block in re.split(r"<ship>", text)[1:]:
    body, closed, _ = block.partition("</ship>")
    out.append({tag: html.unescape(v).strip() for tag, v in _LEAF.findall(body)} if closed
               else "ship record is truncated (no </ship>)")
  return out


@dataclasses.dataclass(frozen=True)
class _Scene:
  """What a scene folder says about all of its ships."""
  id: str
  product: str             # "GRD" or "SLC"
  polarisations: tuple[str, ...]
  orbit_direction: str
  range_spacing_m: float   # ground range for GRD, slant range for SLC
  azimuth_spacing_m: float


def _scene_name(folder: str, source: str) -> str:
  """The nearest folder from `folder` up to `source` named like a Sentinel-1 product."""
  source = os.path.realpath(source)
  while True:
    name = os.path.basename(folder)
    if _SCENE.match(name):
      return name
    if os.path.realpath(folder) == source or os.path.dirname(folder) == folder:
      raise sources.SkipError(f"no enclosing folder is named like a Sentinel-1 product "
                              f"(S1A_IW_GRDH_1SDV_...): {folder}")
    folder = os.path.dirname(folder)


def _read_scene(folder: str, source: str) -> _Scene:
  name = _scene_name(folder, source)
  mode, product, dual, pol = _SCENE.match(name).groups()
  if mode != "IW":
    raise sources.SkipError(f"scene {name}: mode {mode} is not IW (OpenSARShip is IW only)")
  co, cross = (("VV", "VH") if pol == "V" else ("HH", "HV"))
  candidates = [os.path.join(folder, f) for f in (f"{name}.xml", "Metedata.xml", "Metadata.xml")]
  meta = next((p for p in candidates if os.path.isfile(p)), None)
  if meta is None:
    raise sources.SkipError(f"scene {name}: no scene metadata ({name}.xml or Metedata.xml)")
  with open(sources.inside(source, meta), encoding="utf-8", errors="replace") as f:
    attribs = dict(_ATTRIB.findall(f.read()))
  try:
    orbit = attribs["PASS"].lower()
    spacing = [sources.number(attribs[k], k, 0.1, 100.0)
               for k in ("range_spacing", "azimuth_spacing")]
  except KeyError as e:
    raise sources.SkipError(f"scene metadata {meta}: no attribute {e.args[0]}") from None
  if orbit not in ("ascending", "descending"):
    raise sources.SkipError(f"scene metadata {meta}: PASS is {attribs['PASS']!r}")
  return _Scene(name, product[:3], (co, cross) if dual == "D" else (co,), orbit, *spacing)


@dataclasses.dataclass(frozen=True)
class _Task:
  """One ship, parsed and validated, waiting for its image."""
  where: str
  image: str
  scene: _Scene
  chip_id: str
  lat: float
  lon: float
  incidence_deg: float
  direction_px: tuple[float, float]  # head - tail, scene pixels (x = range, y = azimuth)
  box_size_m: tuple[float, float]    # length, beam used for the box
  instance: chip_lib.Instance


def _optional(ship: dict[str, str], tag: str, low: float, high: float, missing: float,
              scale: float = 1.0) -> float:
  """An AIS-style number: NaN when absent, "NA" or its "not available" code `missing`."""
  value = ship.get(tag, "")
  if value in ("", "NA") or sources.number(value, tag, -math.inf, math.inf) == missing:
    return math.nan
  return sources.number(value, tag, low, high) * scale


def _required(ship: dict[str, str], tag: str, low: float, high: float) -> float:
  if tag not in ship:
    raise sources.SkipError(f"field {tag!r} is missing")
  return sources.number(ship[tag], tag, low, high)


def _task(ship: dict[str, str], where: str, scene: _Scene, files: dict[tuple[int, int], str],
          source: str) -> _Task:
  cx, cy = (int(_required(ship, t, 0, 1e6)) for t in ("Center_x", "Center_y"))
  if (cx, cy) not in files:
    raise sources.SkipError(f"no Patch_Cal chip for the ship at x={cx} y={cy}")
  image = sources.inside(source, files[cx, cy])
  length = _optional(ship, "Length", 1, 500, 0)
  if math.isnan(length):
    length = _optional(ship, "Length_overall", 1, 500, 0)
  width = _optional(ship, "Width", 1, 80, 0)
  if math.isnan(width):
    width = _optional(ship, "Breadth_extreme", 1, 80, 0)
  box_length = length if not math.isnan(length) else _required(ship, "Manual_Length", 1, 500)
  box_width = width if not math.isnan(width) else _BEAM_RATIO * box_length
  heading = _optional(ship, "True_Head", 0, 359.999, 511)
  if math.isnan(heading):
    heading = _optional(ship, "Cog", 0, 3599, 3600, scale=0.1)
  code = int(_required(ship, "Ship_Type", 0, 255))
  subtype = ais_type_name(code)
  if not subtype and ship.get("Elaborated_type", "NA") not in ("", "NA"):
    subtype = ship["Elaborated_type"]
  instance = chip_lib.Instance(
      category="ship", box=(0.0, 0.0, 0.0, 0.0), subtype=subtype, length_m=length,
      width_m=width, heading_deg=heading,
      speed_kn=_optional(ship, "Sog", 0, 1022, 1023, scale=0.1))
  return _Task(
      where=f"{where} ({image})", image=image, scene=scene, chip_id=f"{scene.id}_x{cx}_y{cy}",
      lat=_required(ship, "Center_latitude", -90, 90),
      lon=_required(ship, "Center_longitude", -180, 180),
      incidence_deg=_required(ship, "Incidence", 1, 89),
      direction_px=tuple(_required(ship, f"Head_{a}", 0, 1e6) - _required(ship, f"Tail_{a}", 0, 1e6)
                         for a in "xy"),
      box_size_m=(box_length, box_width), instance=instance)


def _box(task: _Task, height: int, width: int, spacing: tuple[float, float]
         ) -> tuple[float, float, float, float]:
  """Axis-aligned box of the ship's length x beam rectangle, rotated to its axis in the image
  (head - tail, in metres), centred on the chip and clipped inside it."""
  sx, sy = spacing
  angle = math.atan2(task.direction_px[1] * sy, task.direction_px[0] * sx)
  length, beam = task.box_size_m
  half_x = 0.5 * (length * abs(math.cos(angle)) + beam * abs(math.sin(angle))) / sx
  half_y = 0.5 * (length * abs(math.sin(angle)) + beam * abs(math.cos(angle))) / sy
  cx, cy = width / 2, height / 2
  return (max(cx - half_x, 0.0), max(cy - half_y, 0.0), min(cx + half_x, float(width)),
          min(cy + half_y, float(height)))


def _load(task: _Task) -> chip_lib.Chip | sources.Skipped:
  """The chip of one ship, or why it cannot be used."""
  try:
    scene = task.scene
    pixels = sources.check_pixels(sources.read_image(task.image), len(scene.polarisations))
    image_db = sources.power_to_db(pixels[..., ::-1])  # file order VH, VV -> VV, VH
    sx = scene.range_spacing_m
    if scene.product == "SLC":
      sx /= math.sin(math.radians(task.incidence_deg))
    spacing = (sx, scene.azimuth_spacing_m)
    geo = sources.place(task.lat, task.lon, ("open sea", "open sea", "open sea"))
  except sources.SkipError as e:
    return sources.Skipped(task.where, str(e))
  h, w = image_db.shape[:2]
  return chip_lib.Chip(
      id=task.chip_id, scene_id=scene.id, image_db=image_db,
      imaging=chip_lib.Imaging(
          platform="Sentinel-1", band="C", mode="IW", polarisations=scene.polarisations,
          pixel_spacing_m=round(math.sqrt(spacing[0] * spacing[1]), 1),
          incidence_deg=task.incidence_deg, orbit_direction=scene.orbit_direction),
      geo=geo, family="target",
      instances=(dataclasses.replace(task.instance, box=_box(task, h, w, spacing)),), count=1)


def _ship_xmls(source: str) -> list[str]:
  out = []
  for folder, dirs, files in os.walk(source):
    dirs.sort()
    out += [os.path.join(folder, f) for f in files if f == "Ship.xml"]
  return out


def _chip_files(folder: str) -> dict[tuple[int, int], str]:
  cal = os.path.join(folder, "Patch_Cal")
  names = sorted(os.listdir(cal)) if os.path.isdir(cal) else []
  return {(int(m[2]), int(m[3])): os.path.join(cal, n) for n in names
          if (m := _CHIP_FILE.fullmatch(n))}


def _tasks(source: str, scenes: Container[str] | None) -> Iterator[_Task | sources.Skipped]:
  seen_scenes, seen_chips = set(), set()
  for xml in _ship_xmls(source):
    folder = os.path.dirname(xml)
    try:
      records = read_ship_xml(sources.inside(source, xml))
    except (sources.SkipError, OSError) as e:
      yield sources.Skipped(xml, f"cannot read Ship.xml: {e}")
      continue
    try:
      scene, scene_error = _read_scene(folder, source), None
      if scene.id in seen_scenes:
        raise sources.SkipError(f"scene {scene.id} appears twice in the source")
      seen_scenes.add(scene.id)
      if scenes is not None and scene.id not in scenes:
        continue
    except sources.SkipError as e:
      scene_error = str(e)
    files = _chip_files(folder)
    for i, ship in enumerate(records):
      where = f"{xml} ship {i}"
      try:
        if scene_error or isinstance(ship, str):
          raise sources.SkipError(scene_error or ship)
        task = _task(ship, where, scene, files, source)
        if task.chip_id in seen_chips:
          raise sources.SkipError(f"two ships share the chip {task.chip_id}")
        seen_chips.add(task.chip_id)
        yield task
      except sources.SkipError as e:
        yield sources.Skipped(where, str(e))


def scene_ids(source: str) -> list[str]:
  """The scenes of the archive (scenes whose folder or metadata is unusable are left out)."""
  return sorted({t.scene.id for t in _tasks(source, None) if isinstance(t, _Task)})


def chips(source: str, *, scenes: Container[str] | None = None, workers: int = 1
          ) -> Iterator[chip_lib.Chip | sources.Skipped]:
  """Every ship of the archive as a Chip, or Skipped with its reason (in a stable order).

  scenes: only these scene ids (all when None); workers: image-decoding processes.
  """
  items = list(_tasks(source, scenes))
  return sources.load_all(items, _Task, _load, workers)


class Opensarship(archive.ArchiveBuilder):
  """OpenSARShip Sentinel-1 ship chips (calibrated VV/VH sigma0, dB); splits by scene."""

  VERSION = tfds.core.Version(VERSION)
  scene_ids_of = staticmethod(scene_ids)
  chips_of = staticmethod(chips)


def builder(data_dir: str, *, source: str, generator, workers: int = 0,
            val_fraction: float = 0.1, test_fraction: float = 0.1) -> Opensarship:
  cfg = archive.ArchiveConfig(name="default", source=os.path.abspath(source), workers=workers,
                              val_fraction=val_fraction, test_fraction=test_fraction)
  return archive.make(Opensarship, data_dir, cfg, generator)
