"""Dense-label builders: HRSID ship scenes (boxes from instance masks) and PolSF land cover."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, needs_shared_data
from klip.data import chip as chip_lib
from klip.data import prepare
from klip.data import schema
from klip.data.builders import hrsid
from klip.data.builders import polsf
from klip.data.builders import sources

HRSID = os.path.join(SHARED_DATA, "hrsid_samples")
POLSF = os.path.join(SHARED_DATA, "polsf")
HRSID_SCENES = {"P0094_0_800_3000_3800": 10, "P0119_2400_3200_6000_6800": 122,
                "P0123_4800_5600_4800_5600": 8, "P0135_1800_2600_4800_5600": 6}


def _prepare(name, source, tmp_path):
  data_dir = str(tmp_path / "data")
  b, report = prepare.prepare(name, data_dir, generator=prepare.make_generator("rules", data_dir),
                              source=str(source), workers=1)
  records = {s: list(b.as_data_source(split=s)) for s in b.info.splits}
  return b, report, records


def _check_records(records, report, family):
  """Scene-disjoint splits, eight field values and a caption per record, consistent text."""
  scenes = {s: {schema.text_of(r["scene_id"]) for r in rs} for s, rs in records.items()}
  assert {"train", "test"} <= set(records) and all(records.values())
  for a in scenes:
    for b in scenes:
      assert a == b or not scenes[a] & scenes[b]
  for rs in records.values():
    for r in rs:
      st = schema.structured_text(r)
      assert st.family == family and len(st.values) == 8 and all(st.values) and st.caption
      image = schema.decode_image(r)
      assert schema.DB_MIN <= image.min() and image.max() <= schema.DB_MAX
  assert not report["consistency_violations"] and not report["scene_leaks"]


def _mask_boxes(mask_path):
  """Independent reference: the tight box of each non-black colour with >= MIN_PIXELS pixels."""
  mask = np.asarray(Image.open(mask_path).convert("RGB"))
  colours, counts = np.unique(mask.reshape(-1, 3), axis=0, return_counts=True)
  boxes = []
  for colour, n in zip(colours, counts):
    if colour.any() and n >= hrsid.MIN_PIXELS:
      ys, xs = np.nonzero((mask == colour).all(-1))
      boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
  return sorted(boxes)


# --- HRSID -------------------------------------------------------------------------------------

@needs_shared_data("hrsid_samples")
def test_hrsid_build_boxes_match_masks(tmp_path):
  b, report, records = _prepare("hrsid", HRSID, tmp_path)
  print(f"hrsid: {report['build_seconds']} s, "
        f"{ {s: [schema.text_of(r['id']) for r in rs] for s, rs in records.items()} }")
  assert f"{b.name}/{b.builder_config.name}" == "hrsid/default"
  assert {s: len(rs) for s, rs in records.items()} == {"train": 2, "val": 1, "test": 1}
  assert not b.skipped
  _check_records(records, report, "target")
  for r in (r for rs in records.values() for r in rs):
    crop = schema.text_of(r["id"])
    assert schema.text_of(r["scene_id"]) == crop.split("_")[0]
    boxes = sorted(tuple(map(int, box)) for box in r["instance_boxes"])
    assert boxes == _mask_boxes(os.path.join(HRSID, crop + hrsid.MASK_SUFFIX))
    assert r["count"] == len(boxes) == HRSID_SCENES[crop]
    assert {schema.text_of(c) for c in r["instance_categories"]} == {"ship"}
    image = schema.decode_image(r)
    assert image.shape == (800, 800, 1) and -25 < np.median(image) < -15  # sea clutter
    assert schema.text_of(r["city"]) == "unknown" and np.isnan(r["lat"]) and np.isnan(r["lon"])
    assert {schema.text_of(g) for g in r["text_generic"]} >= set(hrsid.PLACE_FIELDS)


@needs_shared_data("hrsid_samples")
def test_hrsid_reports_corrupt_and_missing_files(tmp_path):
  source = tmp_path / "hrsid"
  source.mkdir()
  for crop in ("P0135_1800_2600_4800_5600", "P0094_0_800_3000_3800", "P0123_4800_5600_4800_5600"):
    for suffix in (".png", hrsid.MASK_SUFFIX):
      shutil.copyfile(os.path.join(HRSID, crop + suffix), source / (crop + suffix))
  broken = source / "P0094_0_800_3000_3800.png"
  broken.write_bytes(broken.read_bytes()[:5000])
  os.remove(source / ("P0123_4800_5600_4800_5600" + hrsid.MASK_SUFFIX))
  shutil.copyfile(os.path.join(HRSID, "P0135_1800_2600_4800_5600.png"), source / "extra.png")
  b, report, records = _prepare("hrsid", source, tmp_path)
  assert {s: len(rs) for s, rs in records.items()} == {"train": 1}  # one panorama: train
  reasons = {os.path.basename(s.path): s.reason for s in b.skipped}
  assert set(reasons) == {"P0094_0_800_3000_3800.png", "P0123_4800_5600_4800_5600.png",
                          "extra.png"}, reasons
  assert "corrupt" in reasons["P0094_0_800_3000_3800.png"]
  assert "instance mask" in reasons["P0123_4800_5600_4800_5600.png"]
  assert "does not exist" in reasons["P0123_4800_5600_4800_5600.png"]
  assert "crop name" in reasons["extra.png"]
  assert len(report["skipped"]) == 3


def test_ship_boxes_tight_and_specks_dropped():
  mask = np.zeros((20, 30, 3), np.uint8)
  mask[2:6, 3:10] = (128, 0, 0)
  mask[10:18, 20:22] = (0, 64, 128)
  mask[15, 25] = (0, 64, 128)  # a detached part of the same ship widens its box
  mask[0, 29] = (7, 7, 7)      # a one-pixel speck
  assert hrsid.ship_boxes(mask) == [(20.0, 10.0, 26.0, 18.0), (3.0, 2.0, 10.0, 6.0)]


def test_hrsid_split_keeps_train_and_test():
  for n in range(1, 8):
    scenes = [f"P{i:04d}" for i in range(n)]
    split = hrsid.split_of(scenes, 0.1, 0.1)
    counts = {s: list(split.values()).count(s) for s in ("train", "val", "test")}
    assert counts["train"] >= 1 and counts["test"] == (n >= 2) and counts["val"] == (n >= 3)
    assert split == hrsid.split_of(reversed(scenes), 0.1, 0.1)  # order-independent


# --- PolSF -------------------------------------------------------------------------------------

@needs_shared_data("polsf")
def test_polsf_build_landcover_round_trip(tmp_path):
  b, report, records = _prepare("polsf", POLSF, tmp_path)
  split_of = {schema.text_of(r["id"]): s for s, rs in records.items() for r in rs}
  print(f"polsf: {report['build_seconds']} s, {split_of}")
  assert f"{b.name}/{b.builder_config.name}" == "polsf/default"
  assert split_of == {"SF-AIRSAR_r0c0": "train", "SF-AIRSAR_r1c0": "train",
                      "SF-AIRSAR_r1c1": "val", "SF-AIRSAR_r0c1": "test"}
  assert not b.skipped
  _check_records(records, report, "landform")
  labels = np.asarray(Image.open(os.path.join(POLSF, polsf.LABELS)))
  expected = polsf.landcover_of(labels)
  blocks = {blk.id: blk for blk in polsf.blocks(*labels.shape)}
  train_classes = set()
  for split, rs in records.items():
    for r in rs:
      blk = blocks[schema.text_of(r["id"])]
      mask = schema.decode_landcover(r)
      np.testing.assert_array_equal(mask, expected[blk.rows, blk.cols])
      assert polsf.IGNORE in mask and set(np.unique(mask)) <= set(range(7)) | {polsf.IGNORE}
      assert schema.decode_image(r).shape == (450, 512, 2)
      assert schema.text_of(r["city"]) == "San Francisco" and schema.text_of(r["band"]) == "L"
      if split == "train":
        train_classes |= set(np.unique(mask).tolist()) - {polsf.IGNORE}
  assert train_classes == {chip_lib.LANDCOVER_CLASSES.index(c) for c in
                           polsf.LABEL_CLASSES.values()}  # every class is trained on


@needs_shared_data("polsf")
def test_polsf_label_order_checked_against_the_image():
  image_db, landcover = polsf.read_scene(POLSF)
  water = landcover == chip_lib.LANDCOVER_CLASSES.index("water")
  urban = landcover == chip_lib.LANDCOVER_CLASSES.index("urban")
  assert np.median(image_db[water], axis=0).max() < np.median(image_db[urban], axis=0).min()
  # SOURCE_README's order (1 Mountain, 2 Water, 3 Urban, 4 Vegetation, 5 Bare soil) fails
  pauli = np.asarray(Image.open(os.path.join(POLSF, polsf.PAULI)))
  labels = np.asarray(Image.open(os.path.join(POLSF, polsf.LABELS)))
  readme = dict(zip(range(1, 6), ("mountain", "water", "urban", "vegetation", "bare_soil")))
  lut = np.full(256, polsf.IGNORE, np.uint8)
  for value, name in readme.items():
    lut[value] = chip_lib.LANDCOVER_CLASSES.index(name)
  with pytest.raises(sources.SkipError, match="do not match the Pauli image"):
    polsf.check_classes(pauli, lut[labels])


@needs_shared_data("polsf")
def test_polsf_unlabelled_block_and_corrupt_label_map(tmp_path):
  source = tmp_path / "polsf"
  source.mkdir()
  shutil.copyfile(os.path.join(POLSF, polsf.PAULI), source / polsf.PAULI)
  labels = np.asarray(Image.open(os.path.join(POLSF, polsf.LABELS))).copy()
  labels[450:, 512:] = 0  # block r1c1 entirely unlabelled
  Image.fromarray(labels).save(source / polsf.LABELS)
  b, _, records = _prepare("polsf", source, tmp_path)
  assert sorted(schema.text_of(r["id"]) for rs in records.values() for r in rs) == [
      "SF-AIRSAR_r0c0", "SF-AIRSAR_r0c1", "SF-AIRSAR_r1c0"]
  assert [s.reason for s in b.skipped] == ["no labelled pixel in the block"]
  (source / polsf.LABELS).write_bytes(b"\x89PNG\r\n\x1a\n broken")
  skipped = list(polsf.chips(str(source)))
  assert len(skipped) == 1 and polsf.LABELS in skipped[0].reason
  assert "corrupt" in skipped[0].reason
  with pytest.raises(ValueError, match=polsf.LABELS):
    polsf.builder(str(tmp_path / "other"), source=str(source),
                  generator=prepare.make_generator("rules", str(tmp_path)),
                  workers=1).download_and_prepare()


def test_fill_unlabelled_takes_the_nearest_class():
  lc = np.array([[0, 255, 255, 2], [255, 255, 255, 2]], np.uint8)
  np.testing.assert_array_equal(polsf.fill_unlabelled(lc), [[0, 0, 2, 2], [0, 0, 2, 2]])
