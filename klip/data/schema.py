"""The one record schema shared by every KLIP dataset (see docs/data.md).

Every builder (synthetic, and real archives) writes records with these features to ArrayRecord
through TFDS. Images are stored compactly as quantised dB: uint8 PNG (mode "L" for one channel,
"LA" for two), with `db = db_offset + db_scale * pixel`. Ground truth is optional: an empty
instance list, `landcover == b""` and `count == -1` mean "unknown".
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from klip.data import chip as chip_lib
from klip.data import text as text_lib

DB_MIN, DB_MAX = -35.0, 15.0  # the dB range representable in the uint8 encoding
DB_SCALE = (DB_MAX - DB_MIN) / 255.0

_text = tfds.features.Text
_f32 = lambda: tfds.features.Scalar(dtype=np.float32)

FEATURES = tfds.features.FeaturesDict({
    "id": _text(),
    "split": _text(),
    "scene_id": _text(),
    # image: quantised dB, PNG uint8, channels named by `polarisations`
    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
    "db_scale": _f32(),
    "db_offset": _f32(),
    "polarisations": tfds.features.Sequence(_text()),
    "pixel_spacing_m": _f32(),   # native ground spacing, metres per pixel
    "resize_factor": _f32(),     # stored pixels per native pixel
    # imaging metadata
    "platform": _text(),
    "band": _text(),
    "mode": _text(),
    "incidence_deg": _f32(),
    "orbit_direction": _text(),
    # geographic metadata
    "city": _text(),
    "country": _text(),
    "lat": tfds.features.Scalar(dtype=np.float64),
    "lon": tfds.features.Scalar(dtype=np.float64),
    "climate": _text(),
    "terrain": _text(),
    "region_function": _text(),
    # structured text: eight fields of one family, the caption and value-span char offsets
    "family": _text(),
    "field_names": tfds.features.Sequence(_text()),
    "field_values": tfds.features.Sequence(_text()),
    "caption": _text(),
    "value_spans": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
    # how the text generator judged its own fields
    "text_uncertain": tfds.features.Sequence(_text()),  # fields marked uncertain
    "text_generic": tfds.features.Sequence(_text()),    # fields left generic: metadata is silent
    "text_repairs": tfds.features.Sequence(_text()),    # contradictions repaired, and how
    # optional ground truth
    "instance_categories": tfds.features.Sequence(_text()),
    "instance_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),  # x0,y0,x1,y1 px
    "instance_subtypes": tfds.features.Sequence(_text()),  # finer class from the source, or ""
    # length_m, width_m, heading_deg, speed_kn per instance; NaN when unknown
    "instance_attributes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
    "landcover": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG uint8 class ids or b""
    "count": tfds.features.Scalar(dtype=np.int32),
})


def _png(array: np.ndarray) -> bytes:
  mode = {1: "L", 2: "LA"}[array.shape[-1]] if array.ndim == 3 else "L"
  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if mode == "L" and array.ndim == 3 else array,
                  mode=mode).save(buf, format="PNG")
  return buf.getvalue()


def encode_image(image_db: np.ndarray) -> bytes:
  """float dB [H, W, C] (C in 1, 2) -> PNG bytes of the uint8 quantisation."""
  if image_db.ndim != 3 or image_db.shape[-1] not in (1, 2):
    raise ValueError(f"image must be [H, W, 1 or 2] dB, got shape {image_db.shape}")
  q = np.round((np.clip(image_db, DB_MIN, DB_MAX) - DB_MIN) / DB_SCALE)
  return _png(q.astype(np.uint8))


def decode_image(record) -> np.ndarray:
  """A record's image as float32 dB [H, W, C]."""
  with Image.open(io.BytesIO(record["image"])) as im:
    pixels = np.asarray(im)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  channels = len(record["polarisations"])
  if pixels.shape[-1] != channels:
    raise ValueError(f"image has {pixels.shape[-1]} channels, polarisations list {channels}")
  return record["db_offset"] + record["db_scale"] * pixels.astype(np.float32)


def decode_landcover(record) -> np.ndarray | None:
  if not record["landcover"]:
    return None
  with Image.open(io.BytesIO(record["landcover"])) as im:
    return np.asarray(im)


def text_of(value) -> str:
  """A text feature as str (TFDS returns bytes)."""
  return value.decode() if isinstance(value, bytes) else str(value)


def example_id(record) -> str:
  """The record's unique example id."""
  return text_of(record["id"])


class RecordMismatch(ValueError):
  """Per-example data kept beside a dataset (SCIO's pair table) that does not match the record
  it is applied to: not a bad record to skip, a run to stop."""


def structured_text(record) -> text_lib.StructuredText:
  """The record's eight fields and caption."""
  s = text_of
  return text_lib.StructuredText(
      family=s(record["family"]),
      values=tuple(s(v) for v in record["field_values"]),
      caption=s(record["caption"]),
      spans=tuple((int(a), int(b)) for a, b in np.asarray(record["value_spans"]).reshape(-1, 2)))


def to_record(chip: chip_lib.Chip, text: text_lib.StructuredText, split: str, *,
              uncertain=(), generic=(), repairs=()) -> dict:
  """A chip and its structured text (with the generator's judgements) as a record."""
  if text.family != chip.family:
    raise ValueError(f"chip {chip.id}: text family {text.family} != chip family {chip.family}")
  im, geo = chip.imaging, chip.geo
  if chip.image_db.shape[-1] != len(im.polarisations):
    raise ValueError(f"chip {chip.id}: {chip.image_db.shape[-1]} channels but polarisations "
                     f"{im.polarisations}")
  return {
      "id": chip.id, "split": split, "scene_id": chip.scene_id,
      "image": encode_image(chip.image_db), "db_scale": DB_SCALE, "db_offset": DB_MIN,
      "polarisations": list(im.polarisations),
      "pixel_spacing_m": im.pixel_spacing_m, "resize_factor": chip.resize_factor,
      "platform": im.platform, "band": im.band, "mode": im.mode,
      "incidence_deg": im.incidence_deg, "orbit_direction": im.orbit_direction,
      "city": geo.city, "country": geo.country, "lat": geo.lat, "lon": geo.lon,
      "climate": geo.climate, "terrain": geo.terrain, "region_function": geo.region_function,
      "family": text.family, "field_names": list(text.field_names),
      "field_values": list(text.values), "caption": text.caption,
      "value_spans": np.asarray(text.spans, np.int32).reshape(-1, 2),
      "text_uncertain": list(uncertain), "text_generic": list(generic),
      "text_repairs": list(repairs),
      "instance_categories": [i.category for i in chip.instances],
      "instance_boxes": np.asarray([i.box for i in chip.instances], np.float32).reshape(-1, 4),
      "instance_subtypes": [i.subtype for i in chip.instances],
      "instance_attributes": np.asarray(
          [(i.length_m, i.width_m, i.heading_deg, i.speed_kn) for i in chip.instances],
          np.float32).reshape(-1, 4),
      "landcover": b"" if chip.landcover is None else _png(chip.landcover.astype(np.uint8)),
      "count": chip.count,
  }


def to_chip(record) -> chip_lib.Chip:
  """The chip a record was made from (image, metadata, ground truth), e.g. to re-check text."""
  s = text_of
  attrs = np.asarray(record["instance_attributes"], np.float32).reshape(-1, 4)
  instances = tuple(
      chip_lib.Instance(category=s(c), box=tuple(float(v) for v in box), subtype=s(sub),
                        length_m=float(a[0]), width_m=float(a[1]), heading_deg=float(a[2]),
                        speed_kn=float(a[3]))
      for c, box, sub, a in zip(record["instance_categories"], record["instance_boxes"],
                                record["instance_subtypes"], attrs))
  return chip_lib.Chip(
      id=s(record["id"]), scene_id=s(record["scene_id"]), image_db=decode_image(record),
      imaging=chip_lib.Imaging(
          platform=s(record["platform"]), band=s(record["band"]), mode=s(record["mode"]),
          polarisations=tuple(s(p) for p in record["polarisations"]),
          pixel_spacing_m=float(record["pixel_spacing_m"]),
          incidence_deg=float(record["incidence_deg"]),
          orbit_direction=s(record["orbit_direction"])),
      geo=chip_lib.Geo(city=s(record["city"]), country=s(record["country"]),
                       lat=float(record["lat"]), lon=float(record["lon"]),
                       climate=s(record["climate"]), terrain=s(record["terrain"]),
                       region_function=s(record["region_function"])),
      family=s(record["family"]), resize_factor=float(record["resize_factor"]),
      landcover=decode_landcover(record), instances=instances, count=int(record["count"]))
