"""Real-archive builders: OpenSARShip, MSTAR and manifest chips, bad input and TFDS builds."""

import collections
import json
import os
import shutil
import types

import numpy as np
import pytest
import tifffile
from PIL import Image

from klip.data import dataset
from klip.data import schema
from klip.data import text
from klip.data.builders import archive
from klip.data.builders import geotiff
from klip.data.builders import manifest
from klip.data.builders import mstar
from klip.data.builders import opensarship
from klip.data.builders import sources

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
OPENSARSHIP = os.path.join(DATA, "opensarship")
MSTAR = os.path.join(DATA, "mstar", "train")
GEOTIFF = os.path.join(DATA, "sentinel1_geotiff",
                       "S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif")
SCENE = "S1A_IW_GRDH_1SDV_20160131T101646_20160131T101715_009737_00E392_36F7"


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"real data {os.path.abspath(path)} is absent (../shared/data beside the repo)")


class FakeGenerator:
  """Stands in for klip.hcot.generator.Generator: eight fixed field values per chip."""

  backend = types.SimpleNamespace(name="rules")

  def generate(self, chip):
    values = [f"{name} of {chip.id}" for name in chip.field_names]
    return types.SimpleNamespace(text=text.compose(chip.family, values), uncertain=(),
                                 generic=(), repairs=())


def _split(items):
  written = [c for c in items if not isinstance(c, sources.Skipped)]
  skipped = [c for c in items if isinstance(c, sources.Skipped)]
  return written, skipped


def _read_back(b, data_dir):
  name = f"{b.name}/{b.builder_config.name}"
  return {s: list(dataset.source(data_dir, name, s)) for s in b.info.splits}


# --- OpenSARShip -------------------------------------------------------------------------------

def test_opensarship_real_archive_accounts_for_all_351_ships():
  _need(OPENSARSHIP)
  written, skipped = _split(list(opensarship.chips(OPENSARSHIP)))
  reasons = collections.Counter(s.reason for s in skipped)
  print(f"opensarship: {len(written)} written, {len(skipped)} skipped {dict(reasons)}")
  assert len(written) + len(skipped) == 351
  assert all(s.reason and s.path for s in skipped)
  assert len({c.id for c in written}) == len(written)
  assert len({c.scene_id for c in written}) == 8
  for c in written:
    assert c.family == "target" and c.count == 1 and len(c.instances) == 1
    assert c.image_db.shape[-1] == len(c.imaging.polarisations)
    assert c.imaging.polarisations[0] == "VV" and c.imaging.mode == "IW"
    x0, y0, x1, y1 = c.instances[0].box
    h, w = c.image_db.shape[:2]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
  dual = [c for c in written if len(c.imaging.polarisations) == 2]
  # calibrated sigma0 in dB: sea clutter well below 0 dB, VV brighter than VH
  assert np.median([np.median(c.image_db[..., 0]) for c in dual]) > np.median(
      [np.median(c.image_db[..., 1]) for c in dual])
  assert -30 < np.median([np.median(c.image_db[..., 0]) for c in written]) < -5
  slc = [c for c in written if "_SLC_" in c.scene_id]
  assert slc and all(5 < c.imaging.pixel_spacing_m < 9 for c in slc)
  assert {c.imaging.pixel_spacing_m for c in written if "_GRDH_" in c.scene_id} == {10.0}


def test_ais_type_names():
  assert opensarship.ais_type_name(70) == "Cargo"
  assert opensarship.ais_type_name(84) == "Tanker"
  assert opensarship.ais_type_name(52) == "Tug"
  assert opensarship.ais_type_name(0) == ""
  assert opensarship.ais_type_name(222) == ""


_SHIP = """\t<ship>
\t\t<SARShipInformation><Head_x>{hx}</Head_x><Head_y>{y}</Head_y><Tail_x>{tx}</Tail_x>
\t\t<Tail_y>{y}</Tail_y><Center_x>{x}</Center_x><Center_y>{y}</Center_y>
\t\t<Center_longitude>121.77</Center_longitude><Center_latitude>{lat}</Center_latitude>
\t\t<Manual_Length>100</Manual_Length><Incidence>35.0</Incidence></SARShipInformation>
\t\t<AISShipInformation><Sog>123</Sog><Cog>900</Cog><True_Head>511.00</True_Head>
\t\t<Name>TEST &amp; CO</Name><Ship_Type>80</Ship_Type><Length>100</Length><Width>16</Width>
\t\t</AISShipInformation>
\t\t<MarineTrafficInformation><Length_overall>NA</Length_overall>
\t\t<Breadth_extreme>NA</Breadth_extreme><Elaborated_type>NA</Elaborated_type>
\t\t</MarineTrafficInformation>
\t</ship>
"""


def _fake_scene(root, nested: bool):
  """A GRD dual-pol scene of five ships: good TIFF, PNG named .tif, NaN pixels, latitude 95 and
  a chip symlinked out of the source; its Ship.xml ends with the archive's `<\\ShipList>`."""
  folder = os.path.join(root, SCENE, SCENE) if nested else os.path.join(root, SCENE)
  cal = os.path.join(folder, "Patch_Cal")
  os.makedirs(cal)
  ships = [dict(x=100, y=200, lat=28.6), dict(x=300, y=400, lat=28.6),
           dict(x=500, y=600, lat=28.6), dict(x=700, y=800, lat=95.0),
           dict(x=900, y=1000, lat=28.6)]
  with open(os.path.join(folder, "Ship.xml"), "w") as f:
    f.write('<?xml version="1.0" encoding="UTF-8"?>\n<ShipList>\n')
    f.write("".join(_SHIP.format(hx=s["x"] + 5, tx=s["x"] - 5, **s) for s in ships))
    f.write("<\\ShipList>")
  with open(os.path.join(folder, f"{SCENE}.xml"), "w") as f:
    f.write('<attrib name="PASS" value="ASCENDING" />\n<attrib name="range_spacing" '
            'value="10.0" />\n<attrib name="azimuth_spacing" value="10.0" />\n')
  sigma0 = np.full((40, 40, 2), 0.01, np.float32)
  sigma0[..., 0] = 0.001  # file channel 0 is VH
  tifffile.imwrite(os.path.join(cal, "Tanker_x100_y200.tif"), sigma0)
  Image.fromarray(np.full((40, 40, 2), 3, np.uint8), "LA").save(
      os.path.join(cal, "Tanker_x300_y400.tif"), format="PNG")
  sigma0[0, 0, 0] = np.nan
  tifffile.imwrite(os.path.join(cal, "Tanker_x500_y600.tif"), sigma0)
  tifffile.imwrite(os.path.join(cal, "Tanker_x700_y800.tif"), sigma0)
  outside = os.path.join(os.path.dirname(root), "outside.tif")
  tifffile.imwrite(outside, np.ones((40, 40, 2), np.float32))
  os.symlink(outside, os.path.join(cal, "Tanker_x900_y1000.tif"))


@pytest.mark.parametrize("nested", [False, True])
def test_opensarship_quirks_and_bad_input(tmp_path, nested):
  root = str(tmp_path / "archive")
  _fake_scene(root, nested)
  written, skipped = _split(list(opensarship.chips(root)))
  assert [c.id for c in written] == [f"{SCENE}_x100_y200", f"{SCENE}_x300_y400"]
  good = written[0]
  assert good.scene_id == SCENE and good.imaging.orbit_direction == "ascending"
  np.testing.assert_allclose(good.image_db[0, 0], [-20.0, -30.0], atol=1e-4)  # VV, VH in dB
  inst = good.instances[0]
  assert (inst.subtype, inst.length_m, inst.width_m) == ("Tanker", 100.0, 16.0)
  assert inst.heading_deg == pytest.approx(90.0) and inst.speed_kn == pytest.approx(12.3)
  np.testing.assert_allclose(inst.box, (15.0, 19.2, 25.0, 20.8))  # 100 m x 16 m at 10 m, E-W
  assert good.geo.city == "Taizhou"
  reasons = sorted(s.reason for s in skipped)
  assert len(reasons) == 3, reasons
  assert "NaN" in reasons[0] and "'Center_latitude'" in reasons[1] and "escapes" in reasons[2]


def test_opensarship_scene_without_metadata_skips_every_ship(tmp_path):
  root = str(tmp_path / "archive")
  _fake_scene(root, nested=False)
  os.remove(os.path.join(root, SCENE, f"{SCENE}.xml"))
  written, skipped = _split(list(opensarship.chips(root)))
  assert not written and len(skipped) == 5
  assert all("no scene metadata" in s.reason for s in skipped)


# --- MSTAR -------------------------------------------------------------------------------------

def test_mstar_real_archive_writes_all_2746_chips_split_by_aspect_block():
  _need(MSTAR)
  written, skipped = _split(list(mstar.chips(MSTAR)))
  print(f"mstar: {len(written)} written, {len(skipped)} skipped")
  assert len(written) == 2746 and not skipped
  assert len({c.id for c in written}) == 2746
  c = written[0]
  assert c.imaging.band == "X" and c.imaging.polarisations == ("HH",)
  assert c.imaging.incidence_deg == pytest.approx(73.0)
  assert c.geo.city == "Redstone Arsenal" and c.instances[0].category == "vehicle"
  assert all(-35.0 <= c.image_db.min() and c.image_db.max() <= 15.0 for c in written[::50])
  split_of = mstar.split_of(MSTAR, 0.1, 0.1)
  per_class = collections.defaultdict(collections.Counter)
  for c in written:
    per_class[c.instances[0].subtype][split_of[c.scene_id]] += 1
  assert len(per_class) == 10
  for counts in per_class.values():  # every class in every split, most of it in train
    assert set(counts) == {"train", "val", "test"}
    assert counts["train"] > 0.7 * sum(counts.values())


def test_mstar_db_conversion():
  np.testing.assert_allclose(mstar.magnitude_to_db(np.array([0.0, 1.0, 10.0, 255.0])),
                             [-35.0, -35.0, -15.0, 20 * np.log10(255) - 35], rtol=1e-6)


# --- manifest ----------------------------------------------------------------------------------

def _base(**kw):
  entry = dict(image="chip.png", id="a", platform="Sentinel-1", band="C", mode="IW",
               polarisations=["VV"], incidence_deg=35.0, orbit_direction="ascending",
               lat=31.2, lon=121.5, pixel_spacing_m=10.0)
  entry.update(kw)
  return entry


def _write_manifest(tmp_path, geotiff_copy: bool):
  root = tmp_path / "mine"
  root.mkdir()
  Image.fromarray(np.full((32, 32), 100, np.uint8)).save(root / "chip.png")
  Image.fromarray(np.ones((32, 32), np.uint8)).save(root / "cover.png")
  tifffile.imwrite(root / "nan.tif", np.full((32, 32), np.nan, np.float32))
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  (tmp_path / "secret.png").write_bytes((root / "chip.png").read_bytes())
  os.symlink(tmp_path / "secret.png", root / "link.png")
  lines = [
      _base(instances=[{"category": "ship", "box": [10, 10, 20, 14], "subtype": "Cargo",
                        "length_m": 100}], landcover="cover.png", scene_id="s1"),
      _base(id="far", lat=0.0, lon=-160.0),
      _base(id="lat95", lat=95),
      _base(id="res0", pixel_spacing_m=0),
      _base(id="nan", image="nan.tif", scale="db"),
      _base(id="escape", image="../secret.png"),
      _base(id="link", image="link.png"),
      _base(id="corrupt", image="corrupt.png"),
      _base(id="a"),
      _base(id="typo", lattitude=3),
      _base(id="pols", polarisations=["VV", "VH"]),
      _base(id="box", instances=[{"category": "ship", "box": [10, 10, 40, 14]}]),
      {k: v for k, v in _base(id="noband").items() if k != "band"},
  ]
  if geotiff_copy:
    shutil.copy(GEOTIFF, root / "s1.tif")
    lines.append({k: v for k, v in _base(id="geo", image="s1.tif").items()
                  if k not in ("lat", "lon", "pixel_spacing_m")})
  path = root / "manifest.jsonl"
  path.write_text("# my chips\n" + "\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
  return str(path)


def test_manifest_validates_every_field(tmp_path):
  has_geotiff = os.path.exists(GEOTIFF)
  path = _write_manifest(tmp_path, has_geotiff)
  written, skipped = _split(list(manifest.chips(path)))
  by_line = {int(s.path.rsplit(":", 1)[1]): s.reason for s in skipped}
  assert all(s.path.startswith(path + ":") for s in skipped)
  expect = {4: "'lat'", 5: "'pixel_spacing_m'", 6: "NaN", 7: "escapes", 8: "escapes",
            9: "corrupt", 10: "'id'", 11: "lattitude", 12: "channels", 13: "outside",
            14: "['band']", 15 + has_geotiff: "not valid JSON"}
  assert set(by_line) == set(expect), by_line
  for line, needle in expect.items():
    assert needle in by_line[line], (line, by_line[line])
  first = written[0]
  assert first.scene_id == "s1" and first.geo.city == "Shanghai" and first.count == 1
  assert first.image_db[0, 0, 0] == pytest.approx(schema.DB_MIN + 100 * schema.DB_SCALE)
  assert first.landcover.shape == (32, 32) and first.instances[0].subtype == "Cargo"
  assert written[1].geo.city == "unlisted place" and written[1].family == "landform"
  if not has_geotiff:
    pytest.skip(f"GeoTIFF part: {GEOTIFF} is absent")
  geo = written[-1]
  assert geo.geo.lat == pytest.approx(43.594, abs=1e-3)
  assert geo.geo.lon == pytest.approx(4.520, abs=1e-3)
  assert geo.imaging.pixel_spacing_m == 20.0 and geo.image_db.shape == (217, 268, 1)


def test_utm_inverse():
  lat, lon = geotiff.utm_to_latlon(500_000.0, 4_649_776.22, 31, True)
  assert (lat, lon) == (pytest.approx(42.0, abs=1e-6), pytest.approx(3.0, abs=1e-9))


# --- TFDS builds -------------------------------------------------------------------------------

def test_opensarship_tfds_build_and_rerun(tmp_path):
  root = str(tmp_path / "archive")
  _fake_scene(root, nested=True)
  data_dir = str(tmp_path / "data")
  b = opensarship.builder(data_dir, source=root, generator=FakeGenerator(), workers=1)
  b.download_and_prepare()
  assert len(b.skipped) == 3
  records = _read_back(b, data_dir)
  assert sum(len(r) for r in records.values()) == 2
  r = next(r for rs in records.values() for r in rs)
  assert schema.text_of(r["scene_id"]) == SCENE
  assert schema.decode_image(r).shape[-1] == 2
  again = opensarship.builder(data_dir, source=root, generator=FakeGenerator(), workers=1)
  again.download_and_prepare()  # reuses the dataset; skipped items come from skipped.json
  assert sorted(again.skipped, key=str) == sorted(b.skipped, key=str)


def test_a_dataset_built_from_another_source_folder_is_refused_not_reused(tmp_path):
  first, second = str(tmp_path / "first"), str(tmp_path / "second")
  _fake_scene(first, nested=True)
  _fake_scene(second, nested=True)
  data_dir = str(tmp_path / "data")
  opensarship.builder(data_dir, source=first, generator=FakeGenerator(),
                      workers=1).download_and_prepare()
  other = opensarship.builder(data_dir, source=second, generator=FakeGenerator(), workers=1)
  with pytest.raises(archive.SourceMismatch, match=f"built from {first}, not {second}"):
    other.download_and_prepare()
  # the same folder again reuses the dataset
  opensarship.builder(data_dir, source=first, generator=FakeGenerator(),
                      workers=1).download_and_prepare()


def test_mstar_tfds_build_subset(tmp_path):
  _need(MSTAR)
  source = tmp_path / "mstar"
  for cls in ("T72", "D7"):
    (source / cls).mkdir(parents=True)
    for name in sorted(os.listdir(os.path.join(MSTAR, cls)))[:40]:
      shutil.copy(os.path.join(MSTAR, cls, name), source / cls / name)
  data_dir = str(tmp_path / "data")
  b = mstar.builder(data_dir, source=str(source), generator=FakeGenerator(), workers=2,
                    val_fraction=0.0, test_fraction=0.5)
  b.download_and_prepare()
  records = _read_back(b, data_dir)
  assert {s: len(r) for s, r in records.items()} == {"train": 40, "test": 40}
  assert not b.skipped
  scenes = {s: {schema.text_of(r["scene_id"]) for r in rs} for s, rs in records.items()}
  assert not scenes["train"] & scenes["test"]


def test_manifest_tfds_build(tmp_path):
  path = _write_manifest(tmp_path, geotiff_copy=False)
  data_dir = str(tmp_path / "data")
  b = manifest.builder(data_dir, source=path, generator=FakeGenerator(), workers=1)
  b.download_and_prepare()
  records = _read_back(b, data_dir)
  assert sum(len(r) for r in records.values()) == 2 and len(b.skipped) == 12
  r = next(r for rs in records.values() for r in rs if schema.text_of(r["id"]) == "a")
  assert schema.decode_landcover(r).shape == (32, 32)
  assert [schema.text_of(c) for c in r["instance_categories"]] == ["ship"]


def test_real_generator_end_to_end(tmp_path):
  generator_lib = pytest.importorskip("klip.hcot.generator",
                                      reason="klip/hcot/generator.py is not there yet")
  root = str(tmp_path / "archive")
  _fake_scene(root, nested=False)
  data_dir = str(tmp_path / "data")
  gen = generator_lib.Generator(generator_lib.make_backend("rules"))
  b = opensarship.builder(data_dir, source=root, generator=gen, workers=1)
  b.download_and_prepare()
  records = _read_back(b, data_dir)
  captions = [schema.text_of(r["caption"]) for rs in records.values() for r in rs]
  print("\n".join(captions))
  assert len(captions) == 2 and all("ship" in c or "tanker" in c.lower() for c in captions)
