"""MSTAR SOC: preparing a 15 deg collection and the `mstar_soc` evaluator (evals/soc.py).

The shared data holds only the 17 deg collection (../shared/data/mstar/train), so the tests
build small stand-ins in tmp: a few chips per class as the "17 deg" folder and other chips of
the same classes as the "15 deg" one (prepared with depression_deg=15), under a source_root of
the layout the eval config expects (mstar/train, mstar/test).
"""

import os
import shutil
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest

from conftest import SHARED_DATA, eval_config
from evals import data as data_lib
from evals import job as job_lib
from evals import soc
from evals import zeroshot
from evals.predictor import ImageFeatures
from klip.data import dataset as dataset_lib
from klip.data import prepare
from klip.data.builders import mstar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSTAR = os.path.join(SHARED_DATA, "mstar", "train")
CLASSES = sorted(mstar.DIMENSIONS_M)
FIT_PER_CLASS, TEST_PER_CLASS = 6, 4


def _need_mstar():
  if not os.path.isdir(MSTAR):
    pytest.skip(f"real data {os.path.abspath(MSTAR)} is absent (../shared/data beside the repo)")


def copy_chips(into, start: int, per_class: int) -> None:
  """Chips start..start+per_class (by file name) of every class of the real 17 deg folder, as
  into/<CLASS>/ (a tmp stand-in for a collection; never inside the repo)."""
  for cls in CLASSES:
    os.makedirs(os.path.join(into, cls))
    for name in sorted(os.listdir(os.path.join(MSTAR, cls)))[start:start + per_class]:
      shutil.copy(os.path.join(MSTAR, cls, name), os.path.join(into, cls, name))


@pytest.fixture(scope="module")
def source_root(tmp_path_factory):
  """mstar/train (6 chips per class) and mstar/test (4 other chips per class)."""
  _need_mstar()
  root = tmp_path_factory.mktemp("sources")
  copy_chips(root / "mstar" / "train", 0, FIT_PER_CLASS)
  copy_chips(root / "mstar" / "test", 100, TEST_PER_CLASS)
  return str(root)


@pytest.fixture(scope="module")
def prepared_dir(source_root, tmp_path_factory):
  """Where the eval tests prepare the collections on first use (shared: each is built once)."""
  return tmp_path_factory.mktemp("prepared")


def _prepare_cmd(*args):
  return subprocess.run([sys.executable, "-m", "klip.data.prepare", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


# ----- preparing ------------------------------------------------------------------------------
def test_prepare_depression_flag_builds_the_15_degree_collection(source_root, tmp_path):
  out = _prepare_cmd("--dataset=mstar", f"--source={source_root}/mstar/test",
                     f"--data_dir={tmp_path}", "--depression_deg=15", "--workers=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("dataset: mstar/depression15")
  b = dataset_lib.builder(str(tmp_path), "mstar/depression15")
  records = [r for s in b.info.splits for r in dataset_lib.source(str(tmp_path),
                                                                  "mstar/depression15", s)]
  assert len(records) == len(CLASSES) * TEST_PER_CLASS
  assert {float(r["incidence_deg"]) for r in records} == {75.0}  # 90 - 15 on flat ground
  assert {r["instance_subtypes"][0].decode() for r in records} == set(CLASSES)


def test_prepare_depression_flag_is_mstar_only():
  out = _prepare_cmd("--dataset=opensarship", "--source=anywhere", "--depression_deg=15")
  assert out.returncode != 0
  assert "--depression_deg is an mstar option" in out.stderr
  out = _prepare_cmd("--dataset=mstar", "--source=anywhere", "--depression_deg=95")
  assert out.returncode != 0 and "must lie in (0, 90)" in out.stderr


# ----- the evaluator on a fake predictor -----------------------------------------------------
class ClassPredictor:
  """Image features along their MSTAR class's axis (plus noise fixed by the chip id); a class's
  prompts embed along the same axis, so every method should be right on every chip."""

  step = 7

  def __init__(self, dim=16):
    self.dim = dim
    self.owner = {p: CLASSES.index(c) for c in CLASSES
                  for p in zeroshot.class_prompts("subtype", c)}

  def split_features(self, split):
    x = np.stack([np.eye(len(CLASSES), self.dim)[CLASSES.index(c)] + 0.1 *
                  np.random.default_rng(zlib.crc32(i.encode())).normal(size=self.dim)
                  for c, i in zip(data_lib.labels(split, "subtype"), split.ids)])
    return ImageFeatures(embedding=x / np.linalg.norm(x, axis=-1, keepdims=True), pooled=x,
                         patches=None)

  def embed_texts(self, texts):
    return np.eye(len(CLASSES), self.dim)[[self.owner[t] for t in texts]]


def _config(data_dir, source_root, **overrides):
  """The smoke eval config with only mstar_soc, reading the tmp sources, uncapped."""
  c = eval_config(str(data_dir), source_root=source_root, max_examples=0, **overrides)
  c.unlock()
  c.evals = {"mstar_soc": c.evals.mstar_soc}
  c.lock()
  return c


def _datasets(c, pretrain=None):
  pretrain = pretrain or ml_collections.ConfigDict(dict(
      data_dir=c.data_dir, dataset="synthetic/n160_s32_c2_seed0", split="train"))
  return data_lib.Datasets(c.datasets, data_dir=c.data_dir, source_root=c.source_root,
                           pretrain=pretrain, max_examples=c.max_examples)


def test_mstar_soc_scores_every_method_on_the_other_collection(source_root, prepared_dir,
                                                              tmp_path):
  c = _config(prepared_dir, source_root)
  outcomes = job_lib.run_evaluators(c, ClassPredictor(), _datasets(c), str(tmp_path / "out"))
  (o,) = outcomes
  assert o.status == "ok", o.detail
  m = o.metrics
  for method in ("zeroshot", "probe", "knn"):
    assert m[f"{method}/accuracy"] == 1.0 and m[f"{method}/mean_per_class_accuracy"] == 1.0
    assert m[f"{method}/num_examples"] == len(CLASSES) * TEST_PER_CLASS  # the 15 deg chips
    assert m[f"{method}/num_classes"] == len(CLASSES)
    assert os.path.exists(tmp_path / "out" / f"mstar_soc_{method}_confusion_matrix.png")
  for method in ("probe", "knn"):
    assert m[f"{method}/num_train_examples"] == len(CLASSES) * FIT_PER_CLASS  # the 17 deg
  text = "\n".join(o.markdown)
  assert "Fitted on `mstar/depression17:train`" in text and "`mstar/depression15:train`" in text
  assert "### probe" in text and "per-class accuracy" in text
  # the test collection was prepared with its depression angle, in a directory of its own
  test = _datasets(c).split("mstar15", "train")
  assert test.name == "mstar/depression15"
  assert {float(r["incidence_deg"]) for r in test.records} == {75.0}
  datasets = _datasets(c)
  where = {k: datasets._locate(k)[0]  # pylint: disable=protected-access
           for k in ("mstar", "mstar15")}
  assert where["mstar"] != where["mstar15"]


def test_mstar_soc_without_the_15_degree_folder_is_skipped(source_root, tmp_path):
  c = _config(tmp_path / "fresh", source_root, **{"datasets.mstar15.source": "mstar/nowhere"})
  (o,) = job_lib.run_evaluators(c, ClassPredictor(), _datasets(c), str(tmp_path / "out"))
  assert o.status == "skipped", o.detail
  assert "test collection 'mstar15' is not available" in o.detail
  assert "mstar/nowhere does not exist" in o.detail
  assert not os.path.exists(tmp_path / "fresh")  # skipped before preparing the 17 deg side


def test_mstar_soc_refuses_the_same_chips_on_both_sides(source_root, prepared_dir, tmp_path):
  c = _config(prepared_dir, source_root, **{"datasets.mstar15.source": "mstar/train"})
  (o,) = job_lib.run_evaluators(c, ClassPredictor(), _datasets(c), str(tmp_path / "out"))
  assert o.status == "failed" and "HeldOutError" in o.detail
  assert "must be different collections" in o.detail


def test_mstar_soc_keeps_the_pretraining_split_out_of_the_fit(source_root, prepared_dir, tmp_path):
  """A run pretrained on the 17 deg train split (like `small`) may not fit on it."""
  c = _config(prepared_dir, source_root)
  pretrain_dir = str(tmp_path / "pretrain")  # the run's own copy of the 17 deg collection
  prepare.prepare("mstar", pretrain_dir, generator=prepare.make_generator("rules", pretrain_dir),
                  source=os.path.join(source_root, "mstar", "train"), workers=1)
  pretrain = ml_collections.ConfigDict(dict(
      data_dir=pretrain_dir, dataset="synthetic/n8000_s64_c2_seed0+mstar/depression17",
      split="train"))
  (o,) = job_lib.run_evaluators(c, ClassPredictor(), _datasets(c, pretrain),
                                str(tmp_path / "out"))
  assert o.status == "failed" and "HeldOutError" in o.detail and "pretraining split" in o.detail


def test_dataset_options_must_give_the_named_config(source_root, prepared_dir):
  c = _config(prepared_dir, source_root, **{"datasets.mstar15.options": {}})
  with pytest.raises(ValueError, match="gives mstar/depression17"):
    _datasets(c).split("mstar15", "train")


def test_split_lists():
  with pytest.raises(ValueError, match="no split named"):
    soc.split_names(None, "mstar", "+")
  assert soc.split_names(None, "mstar", "val+test") == ["val", "test"]


def test_soc_fit_splits_respect_each_variants_pretraining():
  """Every variant's mstar_soc fits only on splits its pretraining run did not train on."""
  from configs import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from configs import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top
  for variant in eval_lib.VARIANTS:
    c, p = eval_lib.get_config(variant), pretrain_lib.get_config(variant).data
    entry = c.evals.mstar_soc
    for key, splits in ((entry.train_data, entry.train_split), (entry.data, entry.split)):
      if c.datasets[key].name in dataset_lib.parts(p.dataset):
        assert splits != "all" and p.split not in splits.split("+"), (variant, key, splits)


# ----- the smoke checkpoint -------------------------------------------------------------------
@pytest.mark.slow
def test_mstar_soc_on_the_smoke_checkpoint(smoke_predictor, source_root, prepared_dir, tmp_path):
  c = _config(prepared_dir, source_root)
  datasets = _datasets(c, smoke_predictor.config.data)
  (o,) = job_lib.run_evaluators(c, smoke_predictor, datasets, str(tmp_path / "out"))
  assert o.status == "ok", o.detail
  for method in ("zeroshot", "probe", "knn"):
    m = {k.partition("/")[2]: v for k, v in o.metrics.items() if k.startswith(method + "/")}
    assert all(np.isfinite(v) for v in m.values()), m
    assert 0.0 <= m["accuracy/ci_low"] <= m["accuracy"] <= m["accuracy/ci_high"] <= 1.0
    assert m["num_examples"] == len(CLASSES) * TEST_PER_CLASS
