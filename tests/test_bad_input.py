"""Bad input to a build: every row of the table in docs/data.md, built as one manifest.

The table's rows and the cases here must be the same set, and each case's recorded reason must
contain the table's text, so the documented behaviour is the tested one.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from klip.data import schema
from klip.data import splits
from klip.data.builders import archive
from klip.data.builders import manifest
from test_builders import FakeGenerator, _read_back

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "data.md")
ROOT = os.path.join(os.path.dirname(__file__), "..")
GOOD_SCENES = [f"g{k}" for k in range(9)]


def _doc_table() -> dict[str, str]:
  """Row label -> reason text of the "Bad input" table."""
  with open(DOC) as f:
    section = f.read().split("## Bad input", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| (.+?) \| `(.+?)` \|$", section, flags=re.M)
  assert rows, f"no table rows under '## Bad input' in {DOC}"
  return dict(rows)


def _line(**kw) -> bytes:
  entry = dict(image="chip.png", id="x", platform="Sentinel-1", band="C", mode="IW",
               polarisations=["VV"], incidence_deg=35.0, orbit_direction="ascending",
               lat=31.2, lon=121.5, pixel_spacing_m=10.0, scene_id="g0")
  entry.update(kw)
  return json.dumps({k: v for k, v in entry.items() if v is not None}).encode()


def _dead_scene() -> str:
  """A scene id that sorts first in the split hash order among GOOD_SCENES, so it is the test
  split's only scene until the build finds that none of its chips decodes."""
  rank = lambda s: hashlib.sha256(s.encode()).hexdigest()  # the order of splits.assign
  return next(f"dead{k}" for k in range(1000)
              if rank(f"dead{k}") < min(rank(s) for s in GOOD_SCENES))


# doc row -> the manifest line (bytes) that exercises it; "scene" rows are found by scene.
CASES = {
    "a line that is not UTF-8": b'{"id": "caf\xe9"}',
    "a line that is not JSON": b"{broken",
    "a JSON value that is not an object": b"[1, 2]",
    "a required field missing": _line(id="noband", band=None),
    "an unknown (misspelt) field": _line(id="typo", lattitude=3),
    "an id seen on an earlier line": _line(id="g0-0"),
    "a number outside its physical range": _line(id="lat95", lat=95),
    "a path that leaves the manifest's folder (`..`, symlink)": _line(id="esc", image="../out.png"),
    "an image file that does not exist": _line(id="gone", image="missing.png"),
    "a zero-byte or non-image file": _line(id="empty", image="empty.png"),
    "a truncated or corrupt image": _line(id="trunc", image="truncated.png"),
    "NaN or infinite pixels": _line(id="nan", image="nan.tif"),
    "a chip under 8 px on a side": _line(id="1x1", image="1x1.png"),
    "fewer or more channels than polarisations": _line(id="pols", polarisations=["VV", "VH"]),
    "a box outside the image": _line(id="box", instances=[{"category": "ship",
                                                           "box": [10, 10, 40, 14]}]),
    "a land-cover mask of another size": _line(id="cover", landcover="cover16.png"),
    "a scene none of whose chips decodes": None,
}


def _write(tmp_path) -> tuple[str, dict[str, int]]:
  """The manifest (18 good chips in 9 scenes, one dead scene, a line per case); the line number
  of each case."""
  root = tmp_path / "mine"
  root.mkdir()
  png = root / "chip.png"
  Image.fromarray(np.full((32, 32), 100, np.uint8)).save(png)
  (tmp_path / "out.png").write_bytes(png.read_bytes())
  (root / "empty.png").write_bytes(b"")
  (root / "truncated.png").write_bytes(png.read_bytes()[:60])
  tifffile.imwrite(root / "nan.tif", np.full((32, 32), np.nan, np.float32))
  Image.fromarray(np.full((1, 1), 100, np.uint8)).save(root / "1x1.png")
  Image.fromarray(np.ones((16, 16), np.uint8)).save(root / "cover16.png")
  lines = [b"# a lab's chips"]
  lines += [_line(id=f"{s}-{k}", scene_id=s) for s in GOOD_SCENES for k in range(2)]
  lines.append(_line(id="dead-only", image="truncated.png", scene_id=_dead_scene()))
  line_of = {}
  for case, line in CASES.items():
    if line is not None:
      lines.append(line)
      line_of[case] = len(lines)
  path = root / "my chips.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path), line_of


def test_docs_table_lists_exactly_the_tested_cases():
  assert set(_doc_table()) == set(CASES)


def test_every_bad_input_is_skipped_with_the_documented_reason(tmp_path):
  path, line_of = _write(tmp_path)
  data_dir = str(tmp_path / "data")
  b = manifest.builder(data_dir, source=path, generator=FakeGenerator(), workers=1)
  b.download_and_prepare()
  reasons = {s.path: s.reason for s in b.skipped}
  table = _doc_table()
  for case, line in line_of.items():
    where = f"{path}:{line}"
    assert where in reasons, (case, where, sorted(reasons))
    assert table[case] in reasons[where], (case, reasons[where])
  dead = _dead_scene()
  assert table["a scene none of whose chips decodes"] in reasons[f"scene {dead}"]
  assert archive.UNREADABLE_SCENE == reasons[f"scene {dead}"]
  # the dead scene's split was refilled from the good scenes: three splits, every good chip
  records = _read_back(b, data_dir)
  assert set(records) == set(splits.SPLITS)
  scenes = {s: {schema.text_of(r["scene_id"]) for r in rs} for s, rs in records.items()}
  assert set().union(*scenes.values()) == set(GOOD_SCENES)
  assert sum(len(r) for r in records.values()) == 2 * len(GOOD_SCENES)


def test_another_manifest_into_the_same_data_dir_is_another_dataset(tmp_path):
  path, _ = _write(tmp_path)
  data_dir = str(tmp_path / "data")
  first = manifest.builder(data_dir, source=path, generator=FakeGenerator(), workers=1)
  first.download_and_prepare()
  with open(path, "ab") as f:
    f.write(_line(id="g8-2", scene_id="g8") + b"\n")
  second = manifest.builder(data_dir, source=path, generator=FakeGenerator(), workers=1)
  assert second.builder_config.name != first.builder_config.name
  assert re.fullmatch(r"my_chips_[0-9a-f]{8}", second.builder_config.name)
  second.download_and_prepare()
  assert sum(len(r) for r in _read_back(second, data_dir).values()) == 2 * len(GOOD_SCENES) + 1
  assert sum(len(r) for r in _read_back(first, data_dir).values()) == 2 * len(GOOD_SCENES)


def _prepare(source, data_dir):
  return subprocess.run(
      [sys.executable, "-m", "klip.data.prepare", "--dataset=manifest", f"--source={source}",
       f"--data_dir={data_dir}", "--workers=1"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)


def test_prepare_reports_a_non_utf8_line_and_a_dead_split(tmp_path):
  path, line_of = _write(tmp_path)
  run = _prepare(path, tmp_path / "data")
  assert run.returncode == 0, run.stderr[-3000:]
  name = run.stdout.strip().splitlines()[-1].removeprefix("dataset: ")
  with open(tmp_path / "data" / name / manifest.VERSION / "build_report.md") as f:
    report = f.read()
  assert f"{path}:{line_of['a line that is not UTF-8']}`: not UTF-8 text" in report
  assert f"scene {_dead_scene()}`: {archive.UNREADABLE_SCENE}" in report


@pytest.mark.parametrize("content", [b"", b"# nothing here\n\n", b"{broken\n[1]\n"])
def test_a_manifest_with_nothing_usable_fails_and_writes_nothing(tmp_path, content):
  path = tmp_path / "m.jsonl"
  path.write_bytes(content)
  data_dir = tmp_path / "data"
  b = manifest.builder(str(data_dir), source=str(path), generator=FakeGenerator(), workers=1)
  with pytest.raises(archive.NothingToBuild, match="nothing to build from") as e:
    b.download_and_prepare()
  if b"broken" in content:
    assert "all 2 records were skipped" in str(e.value) and "not valid JSON" in str(e.value)
  assert not list(data_dir.glob("manifest/*/*/*.array_record*"))


def test_prepare_exits_1_on_an_empty_manifest(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_bytes(b"")
  run = _prepare(path, tmp_path / "data")
  assert run.returncode == 1
  assert "prepare: manifest: nothing to build from" in run.stderr, run.stderr[-2000:]
  assert "Traceback" not in run.stderr
