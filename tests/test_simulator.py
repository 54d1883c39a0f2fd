"""Tests of the knowledge base, the SAR scene simulator and the HCoT text of simulated chips."""

import json

import numpy as np
import pytest

from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data import simulator
from klip.hcot import consistency
from klip.hcot import generator

SEED = 11
N = 100
WATER = chip_lib.LANDCOVER_CLASSES.index("water")
URBAN = chip_lib.LANDCOVER_CLASSES.index("urban")
RUNWAY = chip_lib.LANDCOVER_CLASSES.index("runway")


@pytest.fixture(scope="module")
def chips():
  return [simulator.simulate_chip(i, SEED) for i in range(N)]


def _centre_class(c, box):
  return c.landcover[int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)]


def test_knowledge_tables():
  cities = knowledge.cities()
  assert len(cities) >= 36
  assert {c.region_function for c in cities} == set(knowledge.REGION_FUNCTIONS)
  assert all(abs(sum(c.landcover_weights) - 1) < 1e-9 for c in cities)
  names = {p.name for p in knowledge.platforms()}
  assert {"Sentinel-1", "Gaofen-3", "TerraSAR-X", "ALOS-2 PALSAR-2"} <= names


def test_knowledge_validation_names_field(tmp_path):
  entry = {"name": "Atlantis", "country": "Nowhere", "lat": 123.0, "lon": 0.0,
           "climate": "temperate oceanic", "terrain": "coastal plain", "region_function": "port",
           "coastal": True, "landcover_weights": {"water": 1.0}}
  path = tmp_path / "cities.json"
  path.write_text(json.dumps({"cities": [entry]}))
  with pytest.raises(ValueError, match=r"cities\.json.*Atlantis.*'lat'"):
    knowledge.load_cities(path)
  entry.update(lat=10.0, landcover_weights={"lava": 1.0})
  path.write_text(json.dumps({"cities": [entry]}))
  with pytest.raises(ValueError, match="'landcover_weights'"):
    knowledge.load_cities(path)
  bad = {"platforms": [{"name": "X-Sat", "band": "C", "wavelength_cm": 5.5, "modes": [
      {"name": "SM", "pixel_spacing_m": [5, 3], "incidence_deg": [20, 40], "looks": 1,
       "polarisations": [["VV"]]}]}]}
  path = tmp_path / "platforms.json"
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"X-Sat.*SM.*'pixel_spacing_m'"):
    knowledge.load_platforms(path)


def test_deterministic_and_seeded():
  a, b = simulator.simulate_chip(7, SEED), simulator.simulate_chip(7, SEED)
  np.testing.assert_array_equal(a.image_db, b.image_db)
  np.testing.assert_array_equal(a.landcover, b.landcover)
  assert (a.id, a.scene_id, a.imaging, a.geo, a.family, a.instances, a.count) == \
         (b.id, b.scene_id, b.imaging, b.geo, b.family, b.instances, b.count)
  c = simulator.simulate_chip(7, SEED + 1)
  assert not np.array_equal(a.image_db, c.image_db)
  assert a.id == simulator.chip_id(7, SEED) == f"syn-{SEED}-0000007"
  assert a.scene_id == a.geo.city == simulator.scene_city(7, SEED).name


def test_ground_truth_consistency(chips):
  families = {c.family for c in chips}
  assert families == {"target", "landform"}
  for c in chips:
    h, w, channels = c.image_db.shape
    assert (h, w) == (64, 64) and channels == 2 == len(c.imaging.polarisations)
    assert c.image_db.dtype == np.float32 and np.isfinite(c.image_db).all()
    assert c.image_db.min() >= -35.0 and c.image_db.max() <= 15.0
    assert c.landcover.dtype == np.uint8 and c.landcover.shape == (h, w)
    assert c.landcover.max() < len(chip_lib.LANDCOVER_CLASSES)
    assert c.count == len(c.instances)
    assert (c.family == "target") == bool(c.instances)
    assert len({i.category for i in c.instances}) <= 1
    for inst in c.instances:
      x0, y0, x1, y1 = inst.box
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
      assert inst.category in chip_lib.TARGET_CATEGORIES
      if inst.category == "ship":
        assert _centre_class(c, inst.box) == WATER
      if inst.category == "aircraft":
        assert _centre_class(c, inst.box) == RUNWAY
    assert abs(c.geo.lat - simulator.scene_city(int(c.id[-7:]), SEED).lat) < 0.3


def test_single_channel_and_large_size():
  c = simulator.simulate_chip(3, SEED, size=224, num_channels=1)
  assert c.image_db.shape == (224, 224, 1) and len(c.imaging.polarisations) == 1
  assert c.landcover.shape == (224, 224)


def test_physics(chips):
  water, urban, co, cross = [], [], [], []
  for c in chips:
    pols = c.imaging.polarisations
    if not simulator.is_cross_pol(pols[0]):
      water.extend(c.image_db[..., 0][c.landcover == WATER].tolist())
      urban.extend(c.image_db[..., 0][c.landcover == URBAN].tolist())
    if simulator.is_cross_pol(pols[1]):
      co.append(c.image_db[..., 0].mean())
      cross.append(c.image_db[..., 1].mean())
  assert np.mean(water) + 10 < np.mean(urban)
  assert len(co) > 10 and np.mean(np.array(cross) < np.array(co)) > 0.9


def test_no_unresolvable_targets():
  for i in range(300):
    c = simulator.simulate_chip(i, SEED)
    if c.imaging.pixel_spacing_m >= 10.0:
      assert all(inst.category != "vehicle" for inst in c.instances)
    for inst in c.instances:
      x0, y0, x1, y1 = inst.box
      assert np.hypot(x1 - x0, y1 - y0) >= simulator.MIN_TARGET_PX - 1e-6
  assert simulator.length_range_m("vehicle", 10.0, 64) is None


def test_parallel_matches_sequential():
  indices = list(range(20, 36))
  sequential = list(simulator.simulate(indices, SEED, workers=1))
  parallel = list(simulator.simulate(indices, SEED, workers=2))
  assert [c.id for c in parallel] == [c.id for c in sequential]
  for a, b in zip(sequential, parallel):
    np.testing.assert_array_equal(a.image_db, b.image_db)
    assert a.instances == b.instances


def test_hcot_text(chips):
  gen = generator.Generator(generator.make_backend("rules"))
  for c in chips:
    st = gen.generate(c).text
    values = st.values
    assert len(values) == 8 and all(v.strip() and "$" not in v for v in values)
    assert st.family == c.family
    assert [st.caption[s:e] for s, e in st.spans] == list(values)
    if c.family == "target":
      assert consistency.stated_number(values[0]) == c.count == len(c.instances)
  assert gen.generate(chips[0]) == gen.generate(chips[0])
