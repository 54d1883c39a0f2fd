"""Classification evaluators: zero-shot, linear probe and k-NN (maths, fakes, smoke checkpoint)."""

import os

import numpy as np
import pytest

from conftest import eval_config, needs_shared_data, real_archives
from evals import classes, knn, linear_probe, zeroshot
from evals.artifacts import Artifacts
from evals.data import Split
from evals.predictor import ImageFeatures


# ----- metric maths ----------------------------------------------------------------------------
def test_confusion_and_per_class_accuracy_by_hand():
  pred, target = np.array([0, 1, 1, 2, 0]), np.array([0, 1, 2, 2, 1])
  np.testing.assert_array_equal(classes.confusion(pred, target, 4),
                                [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
  recall = classes.per_class_accuracy(pred, target, 4)
  np.testing.assert_allclose(recall[:3], [1.0, 0.5, 0.5])
  assert np.isnan(recall[3])  # absent class: not part of the mean
  got = dict(classes.scores(pred, target, 4))
  assert got["accuracy"] == pytest.approx(0.6)
  assert got["mean_per_class_accuracy"] == pytest.approx(2 / 3)
  assert (got["num_classes"], got["num_examples"]) == (4.0, 5.0)
  for name in ("accuracy", "mean_per_class_accuracy"):
    assert 0.0 <= got[f"{name}/ci_low"] <= got[name] <= got[f"{name}/ci_high"] <= 1.0


def test_class_list_vocabulary_and_encoding():
  assert zeroshot.class_list("category", ["ship"]) == sorted(
      ("aircraft", "ship", "storage_tank", "vehicle"))
  assert zeroshot.class_list("region_function", ["port", "airport", "port"]) == [
      "airport", "port"]
  np.testing.assert_array_equal(classes.encode(["b", "a", "b"], ["a", "b"]), [1, 0, 1])


def test_prompts_use_clause_templates_and_readable_names():
  btr = zeroshot.class_prompts("subtype", "BTR60")
  assert btr[0] == "the targets are classified as BTR60"
  assert "the targets are classified as BTR-60 armoured personnel carrier" in btr
  assert "the number of targets is one BTR60" in btr and "a SAR image of BTR60" in btr
  assert "the targets are classified as storage tank" in zeroshot.class_prompts(
      "category", "storage_tank")
  urban = zeroshot.class_prompts("dominant_landcover", "urban")
  assert "the terrain is classified as built-up area" in urban
  assert "the spatial distribution is almost uniformly built-up land" in urban
  port = zeroshot.class_prompts("region_function", "airport")
  assert "the regional function is air transport" in port
  assert "the region is the airport area" in port
  assert zeroshot.class_prompts("terrain", "coastal plain") == [
      "the terrain is classified as coastal plain", "a SAR image of coastal plain"]
  assert len(set(btr)) == len(btr)


def test_class_embedding_is_normalised_prompt_mean():
  vectors = {"a1": [1.0, 0.0], "a2": [0.0, 1.0], "b1": [-1.0, 0.0]}
  z = zeroshot.class_embeddings(lambda texts: np.array([vectors[t] for t in texts]),
                                [["a1", "a2"], ["b1"]])
  np.testing.assert_allclose(z, [[0.5 ** 0.5, 0.5 ** 0.5], [-1.0, 0.0]])


def test_standardise_uses_train_statistics():
  train = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
  x_train, x_test = linear_probe.standardise(train, np.array([[2.0, 6.0]]))
  np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-12)
  np.testing.assert_allclose(x_train[:, 0].std(), 1.0)
  np.testing.assert_allclose(x_test, [[0.0, 1.0]])  # constant feature: centred only


def blobs(n_per_class, num_classes=3, dim=5, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  centres = 4.0 * np.eye(num_classes, dim)
  y = np.repeat(np.arange(num_classes), n_per_class)
  return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_logistic_probe_separates_separable_classes():
  x, y = blobs(20)
  x_test, y_test = blobs(10, seed=1)
  w, b = linear_probe.fit_logistic(x, y, 3, l2=1e-3, max_iter=200)
  np.testing.assert_array_equal(np.argmax(x_test @ w + b, axis=-1), y_test)
  w2, b2 = linear_probe.fit_logistic(x, y, 3, l2=1e-3, max_iter=200)
  np.testing.assert_array_equal(w, w2)  # deterministic
  np.testing.assert_array_equal(b, b2)


def test_logistic_probe_strong_l2_predicts_the_majority_class():
  x, y = blobs(10)
  y = np.concatenate([y, np.zeros(10, np.int64)])  # class 0 is now the majority
  x = np.concatenate([x, blobs(10, seed=2)[0][:10]])
  w, b = linear_probe.fit_logistic(x, y, 3, l2=1e4, max_iter=200)
  assert np.abs(w).max() < 1e-3
  assert np.all(np.argmax(x @ w + b, axis=-1) == 0)


def unit(degrees):
  r = np.radians(np.asarray(degrees, np.float64))
  return np.stack([np.cos(r), np.sin(r)], axis=-1)


def test_knn_hand_built_points():
  train = unit([0, 10, 80, 90, 100])
  train_y = np.array([0, 0, 1, 1, 1])
  test = unit([5, 95])
  np.testing.assert_array_equal(knn.knn_predict(train, train_y, test, 2, k=3), [0, 1])
  # two neighbours at exactly the same cosine: the lower training index wins
  pair, test = np.array([[0.6, 0.8], [0.6, -0.8]]), np.array([[1.0, 0.0]])
  np.testing.assert_array_equal(knn.knn_predict(pair, np.array([1, 0]), test, 2, k=1), [1])
  np.testing.assert_array_equal(knn.knn_predict(pair, np.array([0, 1]), test, 2, k=1), [0])
  # k larger than the training set: every point votes
  np.testing.assert_array_equal(knn.knn_predict(train, train_y, unit([45]), 2, k=50), [1])


def test_knn_vote_is_weighted_by_similarity():
  # one neighbour at cosine 0.9 outweighs two at 0.8 (e^(0.9/T) > 2 e^(0.8/T), T = 0.07) ...
  test = np.array([[1.0, 0.0]])
  def at(cos):
    return [cos, (1 - cos * cos) ** 0.5]
  train = np.array([at(0.9), at(0.8), at(0.8)])
  np.testing.assert_array_equal(knn.knn_predict(train, np.array([0, 1, 1]), test, 2, k=3), [0])
  # ... but not three at 0.85 (3 e^(0.85/T) > e^(0.9/T))
  train = np.array([at(0.9), at(0.85), at(0.85), at(0.85)])
  np.testing.assert_array_equal(
      knn.knn_predict(train, np.array([0, 1, 1, 1]), test, 2, k=4), [1])


# ----- evaluators on fakes -------------------------------------------------------------------
NAMES = ("airport", "industrial", "port", "urban core")


class FakeDatasets:
  """Splits of records carrying only an id and a region_function label."""

  def __init__(self, splits):
    self.splits = splits

  def split(self, key, split, *, max_examples=None):
    labels = self.splits[split]
    return Split(key, "fake/default", split, [
        {"id": f"{split}{i}".encode(), "region_function": n.encode()}
        for i, n in enumerate(labels)][:max_examples or None])


class FakePredictor:
  """Image features given per split; a prompt embeds as its class's direction (plus noise)."""

  def __init__(self, features, dim=8, seed=0):
    self.features = features
    self.rng = np.random.default_rng(seed)
    self.dim = dim
    self.calls = []

  def split_features(self, split):
    x = self.features[split.split][[int(i[len(split.split):]) for i in split.ids]]
    return ImageFeatures(embedding=x / np.linalg.norm(x, axis=-1, keepdims=True), pooled=x,
                         patches=None)

  def embed_texts(self, texts):
    self.calls.append(list(texts))
    owner = {p: c for c, n in enumerate(NAMES)
             for p in zeroshot.class_prompts("region_function", n)}
    z = np.eye(len(NAMES), self.dim)[[owner[t] for t in texts]]
    z = z + 0.1 * self.rng.normal(size=z.shape)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def labelled_features(labels, dim=8, noise=0.1, seed=0):
  rng = np.random.default_rng(seed)
  index = np.array([NAMES.index(n) for n in labels])
  return np.eye(len(NAMES), dim)[index] + noise * rng.normal(size=(len(labels), dim))


def run(evaluator, tmp_path, name):
  artifacts = Artifacts(str(tmp_path), name)
  return dict(evaluator.run(artifacts)), artifacts


def test_zeroshot_fake_known_answer_and_chance(tmp_path):
  labels = [NAMES[i % 4] for i in range(400)] + [""] * 5  # unlabelled records are dropped
  data = FakeDatasets({"test": labels})
  good = FakePredictor({"test": labelled_features([n or "port" for n in labels])})
  got, artifacts = run(zeroshot.Evaluator(good, data, data="x", split="test",
                                          label="region_function"), tmp_path, "zs")
  assert got["accuracy"] == 1.0 and got["mean_per_class_accuracy"] == 1.0
  assert (got["num_classes"], got["num_examples"]) == (4.0, 400.0)
  assert os.path.exists(tmp_path / "zs_confusion_matrix.png")
  assert any("air transport" in m for m in artifacts.markdown)
  rng = np.random.default_rng(1)
  shuffled = FakePredictor({"test": labelled_features(rng.permutation(labels[:400]))})
  got, _ = run(zeroshot.Evaluator(shuffled, data, data="x", split="test",
                                  label="region_function"), tmp_path, "zs_chance")
  assert 0.15 < got["accuracy"] < 0.35


def test_zeroshot_single_prompt_mode(tmp_path):
  data = FakeDatasets({"test": list(NAMES)})
  fake = FakePredictor({"test": labelled_features(NAMES)})
  got, _ = run(zeroshot.Evaluator(fake, data, data="x", split="test", label="region_function",
                                  prompts="single"), tmp_path, "zs1")
  assert fake.calls == [[f"the regional function is {n}" for n in NAMES]]
  assert got["accuracy"] == 1.0
  with pytest.raises(ValueError, match="prompts"):
    zeroshot.Evaluator(fake, data, data="x", split="test", label="region_function",
                       prompts="best")


def test_probe_and_knn_fake_separable_with_unseen_class(tmp_path):
  train = [NAMES[i % 3] for i in range(60)]  # "urban core" never in training
  test = [NAMES[i % 4] for i in range(40)]
  data = FakeDatasets({"train": train, "test": test})
  fake = FakePredictor({"train": labelled_features(train), "test": labelled_features(test, seed=1)})
  for module, kwargs in ((linear_probe, dict(l2=1e-3, epochs=100)), (knn, dict(k=5))):
    got, _ = run(module.Evaluator(fake, data, data="x", label="region_function",
                                  train_split="train", split="test", **kwargs),
                 tmp_path, module.__name__)
    assert got["accuracy"] == pytest.approx(0.75)  # the unseen class: all errors
    assert got["mean_per_class_accuracy"] == pytest.approx(0.75)
    assert (got["num_classes"], got["num_examples"], got["num_train_examples"]) == (3, 40, 60)


# ----- end to end on the smoke checkpoint ------------------------------------------------------
MODULES = {"zeroshot": zeroshot, "linear_probe": linear_probe, "knn": knn}


def check_entry(predictor, datasets, config, name, tmp_path):
  entry = dict(config.evals[name])
  module = MODULES[entry.pop("type")]
  got, artifacts = run(module.Evaluator(predictor, datasets, **entry), tmp_path, name)
  assert all(np.isfinite(v) for v in got.values()), got
  assert 0.0 <= got["accuracy/ci_low"] <= got["accuracy"] <= got["accuracy/ci_high"] <= 1.0
  # a resample can miss a rare class, so the point need not lie inside this percentile interval
  low, high = got["mean_per_class_accuracy/ci_low"], got["mean_per_class_accuracy/ci_high"]
  assert 0.0 <= low <= high <= 1.0 and 0.0 <= got["mean_per_class_accuracy"] <= 1.0
  assert got["num_examples"] >= 1 and got["num_classes"] >= 1
  assert os.path.getsize(tmp_path / f"{name}_confusion_matrix.png") > 0
  assert any("per-class accuracy" in m for m in artifacts.markdown)
  return got


@pytest.mark.parametrize("name", ["zeroshot_category", "zeroshot_scene", "probe_category",
                                  "probe_landcover", "knn_category"])
def test_evaluators_on_smoke_checkpoint(smoke_predictor, eval_datasets, data_dir, tmp_path,
                                        name):
  got = check_entry(smoke_predictor, eval_datasets, eval_config(data_dir), name, tmp_path)
  if name == "zeroshot_category":
    assert got["num_classes"] == 4.0  # the closed category vocabulary


def test_split_without_labels_is_an_error(smoke_predictor, eval_datasets):
  evaluator = zeroshot.Evaluator(smoke_predictor, eval_datasets, data="synthetic", split="test",
                                 label="subtype")
  with pytest.raises(ValueError, match="no 'subtype' labels"):
    list(evaluator.run(None))


@pytest.mark.slow
@real_archives
@needs_shared_data("mstar")
def test_evaluators_on_mstar(smoke_predictor, eval_datasets, data_dir, tmp_path):
  """MSTAR (prepared from ../shared/data on first use, about a minute)."""
  config = eval_config(data_dir)
  for name in ("zeroshot_mstar", "probe_mstar", "knn_mstar"):
    check_entry(smoke_predictor, eval_datasets, config, name, tmp_path)


def test_split_features_rebuild_the_vit_tokens(smoke_predictor, eval_datasets):
  """The matching and VQA evaluators take a split's ViT tokens rebuilt from its cached
  features: the CLS token first, then the patch tokens, whatever the pooled vector is (the
  smoke model pools by the patch tokens' mean)."""
  split = eval_datasets.split("synthetic", "test", max_examples=6)
  f = smoke_predictor.split_features(split)
  direct = smoke_predictor.image_tokens(smoke_predictor.images(split.records))
  np.testing.assert_allclose(smoke_predictor.split_image_tokens(split), direct, rtol=1e-5,
                             atol=1e-5)
  assert smoke_predictor.config.model.pool == "gap"
  np.testing.assert_allclose(f.pooled, direct[:, 1:].mean(axis=1), rtol=1e-4, atol=1e-5)
  assert not np.allclose(f.pooled, f.cls)
