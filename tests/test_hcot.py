"""Tests of the HCoT levels, the rules backend, the consistency checker and the generator."""

import json
import math
import pickle

import numpy as np
import pytest

from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data import simulator
from klip.hcot import backend
from klip.hcot import consistency
from klip.hcot import generator
from klip.hcot import levels
from klip.hcot import rules

WATER, URBAN, MOUNTAIN = (chip_lib.LANDCOVER_CLASSES.index(c) for c in ("water", "urban",
                                                                       "mountain"))
S1 = chip_lib.Imaging(platform="Sentinel-1", band="C", mode="IW", polarisations=("VV", "VH"),
                      pixel_spacing_m=10.0, incidence_deg=34.0, orbit_direction="ascending")
MSTAR = chip_lib.Imaging(platform="MSTAR airborne", band="X", mode="spotlight",
                         polarisations=("HH",), pixel_spacing_m=0.3, incidence_deg=73.0,
                         orbit_direction="")


def _geo(lat, lon, city=""):
  return chip_lib.Geo(city=city, country="", lat=lat, lon=lon, climate="", terrain="",
                      region_function="")


def _chip(imaging=S1, geo=None, instances=(), landcover=None, count=None, size=64,
          family="target", chip_id="hand-0"):
  return chip_lib.Chip(id=chip_id, scene_id="scene", image_db=np.full((size, size, len(
      imaging.polarisations)), -20.0, np.float32), imaging=imaging,
      geo=geo or _geo(31.2304, 121.4737), family=family, landcover=landcover,
      instances=tuple(instances), count=len(instances) if count is None else count)


def _answers(chip):
  """Every level's validated answer from the rules backend."""
  rb, answers = rules.RulesBackend(), {}
  for level in backend.LEVELS:
    req = levels.request(level, chip, answers)
    answers[level] = backend.validate(req, rb.answer(req))
  return answers


GEN = generator.Generator(generator.make_backend("rules"))


def test_geoscience_from_lat_lon():
  shanghai = _answers(_chip())["geoscience"]
  assert shanghai["climate"] == "humid subtropical"
  assert shanghai["climate_source"] == "knowledge base"
  assert shanghai["coast"] == "coastal" and "estuary" in shanghai["setting"]
  assert shanghai["place"] == "Shanghai, China"
  # Mid-Atlantic near the equator: no place within 150 km, the latitude band decides.
  ocean = _answers(_chip(geo=_geo(4.0, -30.0)))["geoscience"]
  assert ocean["climate_source"] == "latitude band" and ocean["climate"] == "tropical rainforest"
  assert "4.00° N, 30.00° W" in ocean["setting"]
  huntsville = _answers(_chip(geo=_geo(34.66, -86.67)))
  assert huntsville["geoscience"]["place"] == "Redstone Arsenal, United States"
  assert huntsville["geoscience"]["coast"] == "inland"
  assert huntsville["society"]["function"] == "military test range"


def test_instances_fit_by_size_and_resolution():
  ship = chip_lib.Instance("ship", (20.0, 30.0, 32.0, 33.0))  # 12 px at 10 m: 120 m
  a = _answers(_chip(instances=[ship]))["instances"]
  assert a["count"] == 1 and a["instances"][0]["fits"] == ["ship"]
  assert a["instances"][0]["length_m"] == pytest.approx(120.0)
  assert a["instances"][0]["cell"] == "centre"
  small = chip_lib.Instance("ship", (5.0, 5.0, 8.0, 6.0))  # 3 px: 30 m
  b = _answers(_chip(instances=[small]))["instances"]
  assert b["instances"][0]["fits"] == ["aircraft", "ship", "storage_tank"]
  assert b["instances"][0]["cell"] == "top left"


def test_physics_slopes_at_l_band():
  palsar = chip_lib.Imaging(platform="ALOS-2 PALSAR-2", band="L", mode="Fine",
                            polarisations=("HH",), pixel_spacing_m=10.0, incidence_deg=25.0,
                            orbit_direction="descending")
  lc = np.full((64, 64), MOUNTAIN, np.uint8)
  a = _answers(_chip(palsar, landcover=lc, family="landform"))["physics"]
  assert {"layover", "foreshortening", "radar shadow"} <= set(a["mechanisms"])
  text = " ".join(a["statements"])
  assert "lay over" in text and "radar shadow" in text and "to the west" in text
  assert "24 cm" in text and a["sensor"].startswith("L-band HH")
  water = _answers(_chip(landcover=np.full((64, 64), WATER, np.uint8), family="landform"))
  assert water["physics"]["mechanisms"] == ["specular reflection"]
  assert "layover" not in water["physics"]["mechanisms"]


def test_consistency_repairs_and_hedges_planted_contradictions():
  lc = np.full((64, 64), WATER, np.uint8)
  lc[:, 40:] = URBAN
  on_water = chip_lib.Instance("ship", (10.0, 10.0, 20.0, 13.0))
  on_land = chip_lib.Instance("ship", (44.0, 40.0, 54.0, 43.0), length_m=900.0)
  wrong_pol = chip_lib.Imaging(platform="Sentinel-1", band="C", mode="IW",
                               polarisations=("HH", "VV"), pixel_spacing_m=10.0,
                               incidence_deg=34.0, orbit_direction="ascending")
  chip = _chip(wrong_pol, instances=[on_water, on_land], landcover=lc, count=3)
  found = {(v.field, v.reason.split(":")[0]) for v in consistency.contradictions(chip)}
  assert ("count", "the metadata count 3 differs from the 2 annotated instances") in found
  assert ("environment", "instance 1") in found and ("size", "instance 1") in found
  assert any(f == "feature" and "does not deliver HH/VV" in r for f, r in found)
  result = GEN.generate(chip)
  values = dict(zip(chip.field_names, result.text.values))
  assert consistency.stated_number(values["count"]) == 2
  assert any(r.startswith("count:") for r in result.repairs)
  assert any(r.startswith("size:") and "900" in r for r in result.repairs)
  assert set(result.uncertain) == {"environment", "feature"}
  assert consistency.HEDGE in values["environment"] and consistency.HEDGE in values["feature"]
  assert consistency.check(chip, "target", result.text.values) == []
  # Without the hedge, the same values are violations.
  bare = [v.split(" (uncertain")[0] for v in result.text.values]
  assert {v.field for v in consistency.check(chip, "target", bare)} == {"environment", "feature"}


def test_check_catches_wrong_values():
  ship = chip_lib.Instance("ship", (20.0, 30.0, 32.0, 33.0))
  lc = np.full((64, 64), WATER, np.uint8)
  chip = _chip(instances=[ship], landcover=lc)
  good = list(GEN.generate(chip).text.values)
  assert consistency.check(chip, "target", good) == []
  names = chip.field_names
  for field, wrong in (("count", "5 ships"), ("location", "the top left of the image"),
                       ("feature", "bright returns in X-band HH"), ("size", "about 400 m long"),
                       ("category", "aircraft")):
    values = list(good)
    values[names.index(field)] = wrong
    assert {v.field for v in consistency.check(chip, "target", values)} == {field}, field
  land = _chip(landcover=lc, family="landform")
  values = list(GEN.generate(land).text.values)
  assert consistency.check(land, "landform", values) == []
  values[land.field_names.index("water")] = "absent"
  assert [v.field for v in consistency.check(land, "landform", values)] == ["water"]
  assert consistency.check(land, "target", values)[0].field == "family"


def test_opensarship_like_chip():
  cargo = chip_lib.Instance("ship", (24.0, 28.0, 42.0, 35.0), subtype="Cargo", length_m=180.0,
                            width_m=30.0, heading_deg=75.0, speed_kn=12.0)
  chip = _chip(geo=_geo(31.05, 122.0), instances=[cargo])
  result = GEN.generate(chip)
  v = dict(zip(chip.field_names, result.text.values))
  assert v["count"] in ("1", "one ship", "1 ship")
  assert v["category"] == "cargo ship" and v["location"] == "the centre of the image"
  assert v["size"].split(" long")[0].endswith("180 m") and "30 m wide" in v["size"]
  assert "18 pixels at 10 m per pixel" in v["size"]
  assert "C-band VV/VH" in v["feature"] and "weaker in VH" in v["feature"]
  assert "wake" in v["feature"]
  assert v["distribution"] == "a single cargo ship under way heading east-northeast at 12 kn"
  assert "Yangtze River estuary on the East China Sea" in v["region"]
  assert "Shanghai" in v["region"] and "humid subtropical" in v["environment"]
  assert result.repairs == () and result.uncertain == () and result.generic == ()


def test_mstar_like_chip():
  t72 = chip_lib.Instance("vehicle", (52.0, 58.0, 76.0, 70.0), subtype="T72")
  chip = _chip(MSTAR, geo=_geo(34.6345, -86.6545), instances=[t72], size=128)
  result = GEN.generate(chip)
  v = dict(zip(chip.field_names, result.text.values))
  assert v["category"] == "T-72 main battle tank" and v["location"] == "the centre of the image"
  assert v["size"].startswith("about 6.9 m long and 3.6 m wide") or "6.9 m long" in v["size"]
  assert "X-band HH" in v["feature"] and "radar shadow cast away from the radar" in v["feature"]
  assert "Redstone Arsenal" in v["region"] and "Huntsville, Alabama" in v["region"]
  assert v["environment"].startswith("a grass field") and "humid subtropical" in v["environment"]
  assert "17° depression" in result.answers["physics"]["sensor"]
  shilka = chip_lib.Instance("vehicle", (52.0, 58.0, 76.0, 70.0), subtype="ZSU_23_4")
  v2 = GEN.generate(_chip(MSTAR, geo=_geo(34.6345, -86.6545), instances=[shilka], size=128))
  assert "self-propelled anti-aircraft gun" in v2.text.values[4]


def test_synthetic_corpus_fields_match_ground_truth():
  gen = pickle.loads(pickle.dumps(GEN))
  families = set()
  for i in range(100):
    c = simulator.simulate_chip(i, 5, size=32 + 32 * (i % 2))
    result = gen.generate(c)
    families.add(c.family)
    v = dict(zip(c.field_names, result.text.values))
    assert consistency.check(c, c.family, result.text.values) == []
    assert result.repairs == () and result.uncertain == () and result.generic == ()
    sensor = f"{c.imaging.band}-band {'/'.join(c.imaging.polarisations)}"
    assert sensor in v[consistency.PHYSICS_FIELD[c.family]]
    assert c.geo.city in (v["region"] if c.family == "target" else v["terrain"])
    if c.family == "target":
      assert consistency.stated_number(v["count"]) == c.count == len(c.instances)
      cat = knowledge.objects().categories[c.instances[0].category]
      assert cat.singular in v["category"] or cat.plural in v["category"]
      h, w = c.landcover.shape
      cells = {chip_lib.GRID_NAMES[chip_lib.grid_cell(x.box, h, w)] for x in c.instances}
      if len(cells) <= 4:
        assert set(consistency._CELL.findall(v["location"])) == cells
      assert c.geo.climate in v["environment"]
    else:
      shares = np.bincount(c.landcover.ravel(), minlength=7)
      assert (v["water"] == "absent") == (shares[WATER] == 0)
      assert (v["buildings"] == "absent") == (shares[URBAN] == 0)
  assert families == {"target", "landform"}


def test_make_backend_and_validation():
  with pytest.raises(ValueError, match="unknown HCoT backend 'gpt'"):
    generator.make_backend("gpt")
  req = levels.request("geoscience", _chip(), {})
  with pytest.raises(backend.InvalidAnswer, match="hand-0, level geoscience"):
    backend.validate(req, {"climate": "x"})
  with pytest.raises(ValueError, match="unknown level"):
    levels.request("poetry", _chip(), {})


def test_knowledge_tables_and_validation(tmp_path):
  objects = knowledge.objects()
  assert objects.subtype("Cargo - Hazard C (Minor)").label == "cargo ship"
  assert objects.subtype("ZSU-23-4").name == "ZSU_23_4" and objects.subtype("NA") is None
  assert {s.name for s in objects.subtypes if s.category == "vehicle"} == {
      "2S1", "BMP2", "BRDM_2", "BTR60", "BTR70", "D7", "T62", "T72", "ZIL131", "ZSU_23_4"}
  assert all(math.isfinite(s.height_m) for s in objects.subtypes if s.category == "vehicle")
  assert set(knowledge.scattering().surfaces) == set(chip_lib.LANDCOVER_CLASSES)
  assert {c.name for c in knowledge.cities()} <= {p.name for p in knowledge.gazetteer()}
  doc = json.loads((knowledge.HERE / "objects.json").read_text())
  doc["subtypes"][0]["category"] = "submarine"
  path = tmp_path / "objects.json"
  path.write_text(json.dumps(doc))
  with pytest.raises(ValueError, match=r"objects\.json.*subtype 0 \(Cargo\).*'category'"):
    knowledge.load_objects(path)
  doc = json.loads((knowledge.HERE / "places.json").read_text())
  del doc["settings"]["Shanghai"]
  path = tmp_path / "places.json"
  path.write_text(json.dumps(doc))
  with pytest.raises(ValueError, match="city 'Shanghai' has no setting"):
    knowledge.load_places(path, knowledge.cities())
