"""`python -m klip.data.prepare` on the real archives: report contents and training on them."""

import json
import os
import subprocess
import sys

import pytest

from conftest import smoke_config
from klip import metrics_writer
from klip import train
from klip.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
OPENSARSHIP = os.path.join(SHARED, "opensarship")


def _need(path):
  if not os.path.isdir(path):
    pytest.skip(f"real data not found at {path} (../shared/data beside the checkout)")


@pytest.fixture(scope="module")
def opensarship_build(tmp_path_factory):
  _need(OPENSARSHIP)
  data_dir = str(tmp_path_factory.mktemp("real"))
  out = subprocess.run(
      [sys.executable, "-m", "klip.data.prepare", "--dataset=opensarship",
       f"--source={OPENSARSHIP}", f"--data_dir={data_dir}", "--workers=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("dataset: opensarship/default")
  path = os.path.join(data_dir, "opensarship", "default")
  version = sorted(os.listdir(path))[-1]
  with open(os.path.join(path, version, "build_report.json")) as f:
    return data_dir, json.load(f), out.stdout


def test_opensarship_report_accounts_for_every_ship(opensarship_build):
  _, report, stdout = opensarship_build
  written = sum(s["examples"] for s in report["splits"].values())
  assert written + len(report["skipped"]) == 351
  assert all(s["reason"] for s in report["skipped"])
  assert report["consistency_violations"] == [] and report["scene_leaks"] == []
  assert len(report["examples"]) == 20 and "## 20 example pairs" in stdout
  fields = report["fields"]
  assert set(fields) == {f"target.{n}" for n in ("count", "location", "feature", "size",
                                                   "category", "distribution", "region",
                                                   "environment")}
  for name, f in fields.items():
    assert f["violations"] == 0, name
    assert f["generic_share"] == 0.0, name  # the metadata speaks to every target field
  assert fields["target.size"]["distinct_values"] > 50  # sizes come from AIS, ship by ship
  assert report["text"]["vocabulary"] > 100


def test_rebuilding_reuses_the_dataset_and_its_report(opensarship_build):
  data_dir, report, _ = opensarship_build
  builder, again = prepare.prepare("opensarship", data_dir,
                                   generator=prepare.make_generator("rules", data_dir),
                                   source=OPENSARSHIP, workers=1)
  assert again["splits"] == report["splits"] and again["examples"] == report["examples"]


def test_training_runs_on_a_real_dataset(opensarship_build, tmp_path):
  data_dir, _, _ = opensarship_build
  config = smoke_config(data_dir, total_steps=3, **{"data.dataset": "opensarship/default"})
  summary = train.train(config, str(tmp_path / "w"))
  rows = metrics_writer.read(os.path.join(str(tmp_path / "w"), "metrics.jsonl"))
  assert summary["steps"] == 3 and rows[-1]["data/skipped"] == 0


def test_llm_backend_needs_a_model_name(tmp_path):
  from absl import app  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match="--llm_model"):
    prepare.make_generator("llm", str(tmp_path), base_url="http://127.0.0.1:9", model=None)
