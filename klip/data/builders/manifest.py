"""A lab's own chips: GeoTIFF or PNG images listed in a JSONL manifest.

    python -m klip.data.prepare --dataset=manifest --source=/data/my_chips/manifest.jsonl

One JSON object per line of UTF-8 (blank lines and lines starting with # are ignored); paths are
relative to the manifest's folder and may not leave it (no `..`, absolute paths or symlinks out).
The dataset is `manifest/<stem>_<hash>` (`config_name`): a new or edited manifest builds anew.

  required  image            GeoTIFF/TIFF or PNG (format read from the content)
            id               unique chip id
            platform, mode   free text, e.g. "Sentinel-1", "IW"
            band             one of knowledge.BANDS
            polarisations    1 or 2 distinct of HH HV VH VV, in image channel order
            incidence_deg    1..89
            orbit_direction  "ascending" or "descending"
  required unless a GeoTIFF has georeferencing (WGS 84 geographic or UTM):
            lat, lon         chip centre, degrees
            pixel_spacing_m  ground spacing, metres (0 < s <= 1000)
  optional  scale            pixel values: "db" (default), "power" (linear sigma0) or "amplitude"
            city             a place name (default: nearest known city within 100 km)
            scene_id         split key (default: the city): chips of one scene share a split
            family           "target" or "landform" (default: target if instances are given)
            instances        [{category, box: [x0, y0, x1, y1] px, subtype, length_m, width_m,
                              heading_deg, speed_kn}]
            count            targets of interest (default: number of instances, else -1)
            landcover        PNG of class ids into chip.LANDCOVER_CLASSES, same size as the image

Pixel values: uint8 PNG/TIFF is the KLIP quantisation (dB = -35 + 50/255 * value, as written by
`schema.encode_image`); other dtypes are read as `scale` says (dB as is, power -> 10 log10,
amplitude -> 20 log10). Unknown fields are rejected, so a misspelt key is never ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Container, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from klip.data import caption as caption_lib
from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data import schema
from klip.data.builders import archive
from klip.data.builders import geotiff
from klip.data.builders import sources

VERSION = "1.0.0"
REQUIRED = ("image", "id", "platform", "band", "mode", "polarisations", "incidence_deg",
            "orbit_direction")
OPTIONAL = ("lat", "lon", "pixel_spacing_m", "scale", "city", "scene_id", "family", "instances",
            "count", "landcover")
SCALES = ("db", "power", "amplitude")
_INSTANCE_NUMBERS = {"length_m": (0.0, 5000.0), "width_m": (0.0, 1000.0),
                     "heading_deg": (0.0, 360.0), "speed_kn": (0.0, 100.0)}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One manifest line, validated; pixels not read yet."""
  where: str
  image: str
  landcover: str | None
  scale: str
  instances: tuple[chip_lib.Instance, ...]
  chip: chip_lib.Chip  # with an empty image


def _text(raw: dict, field: str, choices: tuple[str, ...] | None = None) -> str:
  value = raw[field]
  if not isinstance(value, str) or not value.strip():
    raise sources.SkipError(f"field {field!r}: must be a non-empty string, got {value!r}")
  if choices is not None and value not in choices:
    raise sources.SkipError(f"field {field!r}: must be one of {choices}, got {value!r}")
  return value.strip()


def _number(raw: dict, field: str, low: float, high: float) -> float:
  value = raw[field]
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise sources.SkipError(f"field {field!r}: must be a number, got {value!r}")
  return sources.number(value, field, low, high)


def _instance(raw: Any, k: int) -> chip_lib.Instance:
  where = f"instances[{k}]"
  if not isinstance(raw, dict):
    raise sources.SkipError(f"field {where!r}: must be an object")
  unknown = set(raw) - {"category", "box", "subtype", *_INSTANCE_NUMBERS}
  if unknown:
    raise sources.SkipError(f"field {where!r}: unknown keys {sorted(unknown)}")
  if "category" not in raw or "box" not in raw:
    raise sources.SkipError(f"field {where!r}: needs 'category' and 'box'")
  box = raw["box"]
  if (not isinstance(box, list) or len(box) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 for v in box) or box[0] >= box[2] or box[1] >= box[3] or min(box) < 0):
    raise sources.SkipError(f"field '{where}.box': must be [x0, y0, x1, y1] pixels with "
                            f"0 <= x0 < x1 and 0 <= y0 < y1, got {box!r}")
  numbers = {f: _number(raw, f, *r) if f in raw else math.nan for f, r in _INSTANCE_NUMBERS.items()}
  return chip_lib.Instance(category=_text(raw, "category"), box=tuple(map(float, box)),
                           subtype=_text(raw, "subtype") if "subtype" in raw else "", **numbers)


def _entry(raw: Any, where: str, root: str) -> _Entry:
  if not isinstance(raw, dict):
    raise sources.SkipError("line is not a JSON object")
  missing = [f for f in REQUIRED if f not in raw]
  if missing:
    raise sources.SkipError(f"missing required fields {missing}")
  unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    raise sources.SkipError(f"unknown fields {unknown} (known: {REQUIRED + OPTIONAL})")
  try:
    image = sources.inside(root, _text(raw, "image"))
  except sources.SkipError as e:
    raise sources.SkipError(f"field 'image': {e}") from None
  pols = raw["polarisations"]
  if (not isinstance(pols, list) or not 1 <= len(pols) <= 2 or len(set(pols)) != len(pols)
      or any(p not in knowledge.POLARISATIONS for p in pols)):
    raise sources.SkipError(f"field 'polarisations': must list 1 or 2 distinct of "
                            f"{knowledge.POLARISATIONS}, got {pols!r}")
  given = {f: f in raw for f in ("lat", "lon", "pixel_spacing_m")}
  if all(given.values()):
    lat, lon = _number(raw, "lat", -90, 90), _number(raw, "lon", -180, 180)
    spacing = _number(raw, "pixel_spacing_m", 1e-3, 1000)
  else:
    try:
      lat, lon, spacing = geotiff.centre_and_spacing(image)
    except sources.SkipError as e:
      absent = [f for f, ok in given.items() if not ok]
      raise sources.SkipError(f"fields {absent} absent and image {image}: {e}") from None
    lat = _number(raw, "lat", -90, 90) if given["lat"] else lat
    lon = _number(raw, "lon", -180, 180) if given["lon"] else lon
    spacing = _number(raw, "pixel_spacing_m", 1e-3, 1000) if given["pixel_spacing_m"] else spacing
  geo = sources.place(lat, lon, ("unlisted place", "unknown", "unknown"))
  if "city" in raw:
    geo = dataclasses.replace(geo, city=_text(raw, "city"))
  instances = raw.get("instances", [])
  if not isinstance(instances, list):
    raise sources.SkipError("field 'instances': must be a list")
  instances = tuple(_instance(r, k) for k, r in enumerate(instances))
  family = _text(raw, "family", tuple(caption_lib.FAMILIES)) if "family" in raw else (
      "target" if instances else "landform")
  count = raw.get("count", len(instances) if "instances" in raw else -1)
  if isinstance(count, bool) or not isinstance(count, int) or count < -1:
    raise sources.SkipError(f"field 'count': must be an integer >= -1, got {count!r}")
  try:
    landcover = (sources.inside(root, _text(raw, "landcover")) if "landcover" in raw else None)
  except sources.SkipError as e:
    raise sources.SkipError(f"field 'landcover': {e}") from None
  chip = chip_lib.Chip(
      id=_text(raw, "id"), scene_id=_text(raw, "scene_id") if "scene_id" in raw else geo.city,
      image_db=np.zeros((0, 0, len(pols)), np.float32),
      imaging=chip_lib.Imaging(
          platform=_text(raw, "platform"), band=_text(raw, "band", knowledge.BANDS),
          mode=_text(raw, "mode"), polarisations=tuple(pols), pixel_spacing_m=spacing,
          incidence_deg=_number(raw, "incidence_deg", 1, 89),
          orbit_direction=_text(raw, "orbit_direction", ("ascending", "descending"))),
      geo=geo, family=family, instances=instances, count=count)
  return _Entry(where=where, image=image, landcover=landcover,
                scale=_text(raw, "scale", SCALES) if "scale" in raw else "db",
                instances=instances, chip=chip)


def _entries(manifest: str) -> Iterator[_Entry | sources.Skipped]:
  root = os.path.dirname(os.path.abspath(manifest))
  ids = set()
  with open(manifest, "rb") as f:
    for n, data in enumerate(f, 1):
      where = f"{manifest}:{n}"
      try:
        try:
          line = data.decode("utf-8")
        except UnicodeDecodeError as e:
          raise sources.SkipError(f"not UTF-8 text: byte {data[e.start]:#04x} at column "
                                  f"{e.start + 1}") from None
        if not line.strip() or line.lstrip().startswith("#"):
          continue
        try:
          raw = json.loads(line)
        except json.JSONDecodeError as e:
          raise sources.SkipError(f"not valid JSON: {e}") from None
        entry = _entry(raw, where, root)
        if entry.chip.id in ids:
          raise sources.SkipError(f"field 'id': {entry.chip.id!r} appears on an earlier line")
        ids.add(entry.chip.id)
        yield entry
      except sources.SkipError as e:
        yield sources.Skipped(where, str(e))


def _to_db(pixels: np.ndarray, scale: str) -> np.ndarray:
  if pixels.dtype == np.uint8:
    if scale != "db":
      raise sources.SkipError(f"field 'scale': uint8 images are KLIP-quantised dB, not {scale}")
    return schema.DB_MIN + schema.DB_SCALE * pixels.astype(np.float32)
  values = pixels.astype(np.float32)
  if scale == "db":
    return values
  return sources.power_to_db(values if scale == "power" else np.square(values))


def _load(entry: _Entry) -> chip_lib.Chip | sources.Skipped:
  chip = entry.chip
  try:
    pixels = sources.read_pixels(entry.image)
    sources.check_pixels(pixels.astype(np.float32), len(chip.imaging.polarisations))
    image_db = _to_db(pixels, entry.scale)
    h, w = image_db.shape[:2]
    for k, inst in enumerate(entry.instances):
      if inst.box[2] > w or inst.box[3] > h:
        raise sources.SkipError(f"field 'instances[{k}].box': {inst.box} outside the {w}x{h} "
                                "image")
    landcover = None
    if entry.landcover:
      landcover = sources.read_pixels(entry.landcover)
      if (landcover.shape != (h, w, 1) or landcover.dtype != np.uint8
          or landcover.max() >= len(chip_lib.LANDCOVER_CLASSES)):
        raise sources.SkipError(
            f"field 'landcover': must be uint8 class ids < {len(chip_lib.LANDCOVER_CLASSES)} of "
            f"shape {h}x{w}, got {landcover.dtype} {landcover.shape[:2]} max {landcover.max()}")
      landcover = landcover[..., 0]
  except sources.SkipError as e:
    return sources.Skipped(entry.where, f"{e} (image {entry.image})")
  return dataclasses.replace(chip, image_db=image_db.astype(np.float32), landcover=landcover)


def scene_ids(manifest: str) -> list[str]:
  """The scene ids of the usable manifest lines."""
  return sorted({e.chip.scene_id for e in _entries(manifest) if isinstance(e, _Entry)})


def chips(manifest: str, *, scenes: Container[str] | None = None, workers: int = 1
          ) -> Iterator[chip_lib.Chip | sources.Skipped]:
  """Every manifest line as a Chip, or Skipped naming the file, line and field (in order).

  scenes: only these scene ids (all when None); workers: image-decoding processes.
  """
  items = [e for e in _entries(manifest)
           if not isinstance(e, _Entry) or scenes is None or e.chip.scene_id in scenes]
  return sources.load_all(items, _Entry, _load, workers)


class Manifest(archive.ArchiveBuilder):
  """A lab's own GeoTIFF/PNG chips listed in a JSONL manifest; splits by scene (or city)."""

  VERSION = tfds.core.Version(VERSION)
  NAMED_BY_CONTENT = True  # config_name: a moved copy of a manifest is the same dataset
  scene_ids_of = staticmethod(scene_ids)
  chips_of = staticmethod(chips)


def config_name(manifest: str) -> str:
  """`<file stem>_<first 8 hex of the content's SHA-256>`: another manifest, or an edited one,
  is another dataset beside the first, never a silent reuse of it."""
  digest = hashlib.sha256()
  with open(manifest, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(manifest))[0].lower())
  return f"{stem.strip('_') or 'manifest'}_{digest.hexdigest()[:8]}"


def builder(data_dir: str, *, source: str, generator, workers: int = 0,
            val_fraction: float = 0.1, test_fraction: float = 0.1) -> Manifest:
  """`source`: the manifest JSONL file; the config name is `config_name(source)`."""
  if not os.path.isfile(source):
    raise FileNotFoundError(f"manifest: source {source!r} is not a file (expected the JSONL "
                            "manifest)")
  cfg = archive.ArchiveConfig(name=config_name(source), source=os.path.abspath(source),
                              workers=workers,
                              val_fraction=val_fraction, test_fraction=test_fraction)
  return archive.make(Manifest, data_dir, cfg, generator)
