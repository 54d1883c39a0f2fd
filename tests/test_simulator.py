"""Tests of the knowledge base, the SAR scene simulator and the HCoT text of simulated chips."""

import json

import numpy as np
import pytest
from scipy import ndimage

from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data import simulator
from klip.data import simulator_scene
from klip.data import simulator_targets
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
    if not simulator_scene.is_cross_pol(pols[0]):
      water.extend(c.image_db[..., 0][c.landcover == WATER].tolist())
      urban.extend(c.image_db[..., 0][c.landcover == URBAN].tolist())
    if simulator_scene.is_cross_pol(pols[1]):
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
      assert max(x1 - x0, y1 - y0) >= simulator_targets.MIN_TARGET_PX
  assert simulator_targets.length_range_m("vehicle", 10.0, 64) is None
  assert simulator_targets.length_range_m("vehicle", 3.0, 64) == (12.0, 12.0)


def _scr_db(t: simulator_targets.TargetTrace) -> float:
  """The visibility rule of `simulator_targets.scr_db`, written out again from its definition."""
  y0, y1, x0, x1 = t.window
  floor = t.clutter + 10.0 ** (simulator_scene.NESZ_DB / 10.0)
  w = t.cover / t.cover.sum()
  under = np.array([(ch[y0:y1, x0:x1] * w).sum() for ch in floor])
  signal = under + (t.added * w).sum()
  bx0, by0 = np.floor(t.instance.box[:2]).astype(int)
  bx1, by1 = np.ceil(t.instance.box[2:]).astype(int)
  yy, xx = np.mgrid[0:floor.shape[1], 0:floor.shape[2]]
  gap = np.maximum(np.maximum(bx0 - xx, xx - (bx1 - 1)), np.maximum(by0 - yy, yy - (by1 - 1)))
  ring = (gap >= 1) & (gap <= simulator_targets.SCR_RING_PX)
  around = np.array([np.median(ch[ring]) for ch in floor])
  return float(np.min(10.0 * np.log10(signal / np.maximum(under, around))))


def test_reported_targets_are_large_and_bright_enough():
  """Every reported instance passes the size and signal-to-clutter rules, recomputed here."""
  seen = set()
  for i in range(200):
    c, trace = simulator.simulate_chip_traced(i, SEED)
    assert [t.instance for t in trace] == list(c.instances)
    if i % 20 == 0:
      plain = simulator.simulate_chip(i, SEED)
      np.testing.assert_array_equal(plain.image_db, c.image_db)
      assert plain.instances == c.instances
    for t in trace:
      seen.add(t.instance.category)
      x0, y0, x1, y1 = t.instance.box
      assert max(x1 - x0, y1 - y0) >= simulator_targets.MIN_TARGET_PX
      assert t.cover.sum() >= simulator_targets.MIN_TARGET_AREA_PX
      scr = _scr_db(t)
      assert scr >= simulator_targets.MIN_SCR_DB, (c.id, t.instance)
      assert scr == pytest.approx(simulator_targets.scr_db(t.clutter, t.window, t.cover,
                                                           t.added, t.instance.box))
      # The raster lies within the box (pixel coverage of a rotated part may spill a fraction of
      # a pixel past its corners): the box is what the pixels show, no more.
      wy0, wy1, wx0, wx1 = t.window
      yy, xx = np.mgrid[wy0:wy1, wx0:wx1] + 0.5
      outside = (xx < x0 - 1) | (xx > x1 + 1) | (yy < y0 - 1) | (yy > y1 + 1)
      assert not t.added[outside].any()
  assert seen == set(chip_lib.TARGET_CATEGORIES)


@pytest.fixture(scope="module")
def many():
  return list(simulator.simulate(range(DETECT_N), SEED, workers=2))


DETECT_N = 300
GRID_EDGES = (0, 21, 42, 64)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """a [H, W, C] moved by (dy, dx) pixels, edges repeated: out[y, x] = a[y + dy, x + dx]."""
  p = max(abs(dy), abs(dx))
  padded = np.pad(a, ((p, p), (p, p), (0, 0)), mode="edge")
  return padded[p + dy:p + dy + a.shape[0], p + dx:p + dx + a.shape[1]]


def detect_cells(image_db: np.ndarray, threshold_db: float = 10.0, min_px: int = 2) -> set[int]:
  """3x3-grid cells holding a detection of a greatest-of CFAR detector on the dB image.

  A pixel is detected where its 3x3 mean (dB) exceeds, in some channel, the brightest of four
  9x9 background means 6 or 12 px above, below, left and right of it by `threshold_db`; taking
  the brightest side keeps land edges and bright blocks from firing. Each 8-connected detection
  of at least `min_px` pixels reports the cell of its centroid, as the text places a target.
  """
  db = image_db.astype(np.float64)
  local = ndimage.uniform_filter(db, (3, 3, 1), mode="nearest")
  background = ndimage.uniform_filter(db, (9, 9, 1), mode="nearest")
  contrast = np.full(db.shape[:2], -np.inf)
  for k in (6, 12):
    side = np.max([_shift(background, dy, dx) for dy, dx in ((k, 0), (-k, 0), (0, k), (0, -k))],
                  axis=0)
    contrast = np.maximum(contrast, (local - side).max(axis=2))
  labels, n = ndimage.label(contrast > threshold_db, structure=np.ones((3, 3)))
  if n == 0:
    return set()
  index = np.arange(1, n + 1)
  sizes = ndimage.sum_labels(np.ones_like(contrast), labels, index)
  h, w = contrast.shape
  cells = set()
  for (cy, cx), px in zip(ndimage.center_of_mass(np.ones_like(contrast), labels, index), sizes):
    if px >= min_px:
      cells.add(chip_lib.grid_cell((cx + 0.5, cy + 0.5, cx + 0.5, cy + 0.5), h, w))
  return cells


def cell_scores(chips) -> tuple[float, float]:
  """Recall of the cells holding a reported target's box centre and specificity of the others,
  over all 9 cells of every chip, for `detect_cells`."""
  hit = occupied = rejected = empty = 0
  for c in chips:
    h, w = c.image_db.shape[:2]
    truth = {chip_lib.grid_cell(i.box, h, w) for i in c.instances}
    found = detect_cells(c.image_db)
    hit, occupied = hit + len(truth & found), occupied + len(truth)
    rejected, empty = rejected + 9 - len(truth | found), empty + 9 - len(truth)
  return hit / occupied, rejected / empty


def box_scores(chips, false_alarm: float = 0.05) -> float:
  """Share of reported boxes that a box detector finds at a `false_alarm` rate.

  The detector compares a box's mean intensity (speckled image, strongest channel) with the
  median of a 2 px ring around it; its threshold is the (1 - false_alarm) quantile of the same
  statistic over boxes of the same sizes put at random places clear of every target.
  """
  rng = np.random.default_rng(0)

  def statistic(intensity, x0, y0, x1, y1):
    ring = np.zeros(intensity.shape[:2], dtype=bool)
    ring[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
    ring[y0:y1, x0:x1] = False
    inside = intensity[y0:y1, x0:x1].mean(axis=(0, 1))
    return float(np.max(10.0 * np.log10(inside / np.median(intensity[ring], axis=0))))

  reported, random = [], []
  for c in chips:
    intensity = 10.0 ** (c.image_db.astype(np.float64) / 10.0)
    h, w = intensity.shape[:2]
    boxes = [simulator_targets.box_pixels(i.box, w) for i in c.instances]
    taken = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
      taken[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
    for x0, y0, x1, y1 in boxes:
      reported.append(statistic(intensity, x0, y0, x1, y1))
      bw, bh = x1 - x0, y1 - y0
      for _ in range(50):
        rx, ry = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        if not taken[ry:ry + bh, rx:rx + bw].any():
          random.append(statistic(intensity, rx, ry, rx + bw, ry + bh))
          break
  threshold = np.quantile(random, 1.0 - false_alarm)
  return float(np.mean(np.array(reported) > threshold))


def test_detector_finds_the_reported_target_cells(many):
  """The 3x3-grid cells the text names are where a plain CFAR detector finds targets."""
  recall, specificity = cell_scores(many)
  assert recall >= 0.85 and specificity >= 0.88, (recall, specificity)


def test_reported_boxes_stand_out_after_speckle(many):
  """A reported box is brighter than its surroundings in the speckled image, as a random box
  of the same size is not."""
  assert box_scores(many) >= 0.9


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
