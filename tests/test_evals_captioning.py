"""Captioning: BLEU / ROUGE-L / CIDEr by hand, caption parsing, field accuracy, the evaluator."""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from evals import captioning
from evals.artifacts import Artifacts
from klip.data import caption as caption_lib
from klip.data import text as text_lib

TARGET = ("three ships", "the top left", "bright points", "about 50 m long", "small ships",
          "clustered", "the port of Ulsan", "open water")
LANDFORM = ("coastal plain", "port", "built-up land (60 %)", "a grid", "sharp",
            "dense blocks", "a ring road", "a wide river")


def scores(references, hypotheses):
  return dict(captioning.caption_scores(references, hypotheses))


def test_identical_captions_score_perfectly():
  captions = [text_lib.compose("target", TARGET).caption,
              text_lib.compose("landform", LANDFORM).caption, "a completely different text"]
  got = scores(captions, captions)
  assert got["bleu4"] == pytest.approx(1.0)
  assert got["rouge_l"] == pytest.approx(1.0)
  assert got["cider"] == pytest.approx(10.0)  # CIDEr-D's x10, every n-gram order matching


def test_bleu_and_rouge_of_a_small_case_by_hand():
  # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths: no brevity penalty.
  got = scores(["a b c d f"], ["a b c d e"])
  assert got["bleu4"] == pytest.approx(0.2 ** 0.25)
  assert got["rouge_l"] == pytest.approx(0.8)  # LCS 4 of 5 both ways
  # all precisions 1, hypothesis 4 tokens against 6: brevity penalty exp(1 - 6/4).
  assert scores(["a b c d e f"], ["a b c d"])["bleu4"] == pytest.approx(np.exp(-0.5))
  # LCS 3: precision 1, recall 1/2, F-measure with beta 1.2.
  assert scores(["a x b y c z"], ["a b c"])["rouge_l"] == pytest.approx(
      (1 + 1.2 ** 2) * 0.5 / (0.5 + 1.2 ** 2))


def test_corpus_bleu_is_pycocoevalcaps_and_its_interval_brackets_it():
  rng = np.random.default_rng(0)
  words = np.array("a b c d e f g".split())
  refs = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(30)]
  hyps = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(30)]
  expected, _ = Bleu(4).compute_score({i: [r] for i, r in enumerate(refs)},
                                      {i: [h] for i, h in enumerate(hyps)}, verbose=0)
  statistics = captioning.bleu_statistics(refs, hyps)
  assert statistics.shape == (30, 10)
  assert captioning.corpus_bleu(statistics) == pytest.approx(expected[3], rel=1e-12)
  got = scores(refs, hyps)
  assert got["bleu4"] == pytest.approx(expected[3], rel=1e-12)
  assert got["bleu4/ci_low"] < got["bleu4"] < got["bleu4/ci_high"]


def test_field_values_parse_composed_and_generated_captions():
  for family, values in (("target", TARGET), ("landform", LANDFORM)):
    assert captioning.field_values(text_lib.compose(family, values).caption,
                                   family) == list(values)
  # as Predictor.caption joins them: values that no longer fit are empty
  names = caption_lib.FAMILIES["landform"]
  values = ["coastal plain", "", "a $ b", "", "", "", "", ""]
  generated = caption_lib.SEPARATOR.join(caption_lib.PREFIXES[n] + v for n, v in zip(names, values))
  assert captioning.field_values(generated, "landform") == values
  with pytest.raises(ValueError, match="not a target caption"):
    captioning.field_values(generated, "target")


def test_field_accuracy_by_hand():
  def record(family, values):
    return {"family": family.encode(), "field_names": [n.encode() for n in
                                                       caption_lib.FAMILIES[family]],
            "field_values": [v.encode() for v in values]}
  records = [record("target", TARGET), record("landform", LANDFORM)]
  wrong_count = ("Three Ships.",) + TARGET[1:3] + ("x",) + TARGET[4:]  # case ignored, size wrong
  captions = [text_lib.compose("target", wrong_count).caption,
              text_lib.compose("landform", ("x",) * 8).caption]
  matches = captioning.field_matches(records, captions)
  assert sum(matches[0].values()) == 7 and not any(matches[1].values())
  got = dict(captioning.field_accuracy(matches))
  assert got["field_accuracy"] == pytest.approx(7 / 16)
  assert got["field/count"] == 1.0 and got["field/size"] == 0.0
  assert got["field/distribution"] == 0.5  # shared by both families
  assert got["field/water"] == 0.0 and "field/water/ci_high" in got


def _record(family, values):
  return {"family": family.encode(), "field_names": [n.encode() for n in
                                                     caption_lib.FAMILIES[family]],
          "field_values": [v.encode() for v in values]}


def test_the_constant_captioner_answers_each_fields_most_frequent_train_value():
  other = ("two ships",) + TARGET[1:]
  train = [_record("target", TARGET), _record("target", other), _record("target", other),
           _record("landform", LANDFORM)]
  test = [_record("target", ("Three ships.",) + TARGET[1:]),  # normalised: not "two ships"
          _record("target", other), _record("landform", ("x",) + LANDFORM[1:])]
  matches = captioning.constant_matches(train, test)
  assert [m["count"] for m in matches[:2]] == [False, True]
  assert all(matches[0][n] for n in caption_lib.FAMILIES["target"][1:])
  assert not matches[2]["terrain"] and sum(matches[2].values()) == 7
  # a family the train records never show has no constant answer
  assert not any(captioning.constant_matches(train[:1], test[2:])[0].values())


class MixedFamilies:
  """Datasets whose split is the first two target and two landform records of the test split,
  so that both generation groups run."""

  def __init__(self, datasets):
    split = datasets.split("synthetic", "test")
    families = split.texts("family")
    self.split_obj = split.subset([i for i, f in enumerate(families) if f == "target"][:2]
                                  + [i for i, f in enumerate(families) if f == "landform"][:2])

  def split(self, key, split, *, max_examples=None):
    assert (key, split, max_examples) == ("synthetic", "test", 4)
    return self.split_obj


def test_evaluator_on_smoke_checkpoint(smoke_predictor, eval_datasets, tmp_path):
  datasets = MixedFamilies(eval_datasets)
  assert datasets.split_obj.texts("family") == ["target"] * 2 + ["landform"] * 2
  artifacts = Artifacts(str(tmp_path), "captioning")
  evaluator = captioning.Evaluator(smoke_predictor, datasets, data="synthetic", split="test",
                                   beam_size=1, max_span=4, max_examples=4)
  got = dict(evaluator.run(artifacts))
  assert got["num_examples"] == 4
  assert all(np.isfinite(v) for v in got.values()), got
  for name in ["bleu4", "rouge_l", "field_accuracy", "field/count", "field/terrain"]:
    assert 0.0 <= got[f"{name}/ci_low"] <= got[name] <= got[f"{name}/ci_high"] <= 1.0
  assert 0.0 <= got["cider/ci_low"] <= got["cider"] <= got["cider/ci_high"] <= 10.0
  assert got["rouge_l"] > 0.1  # the forced templates alone overlap the references
  assert not any(k.startswith("meteor") for k in got)
  table = next(m for m in artifacts.markdown if "Reference and generated captions" in m)
  rows = table.splitlines()[4:]
  assert len(rows) == 4 and all(r.endswith("/8 |") for r in rows)
  assert all(r.count(" $ ") >= 2 * 7 for r in rows)  # reference and generated: 8 clauses each


def test_content_accuracy_counts_a_reworded_right_answer():
  records = [_record("target", TARGET)]
  reworded = ("3",) + TARGET[1:]  # TARGET says "three ships"
  caption = text_lib.compose("target", reworded).caption
  exact = captioning.field_matches(records, [caption])
  content = captioning.field_matches(records, [caption], "content")
  assert not exact[0]["count"] and content[0]["count"]
  got = dict(captioning.field_accuracy(content, "content"))
  assert got["content_accuracy"] == 1.0 and got["content/count"] == 1.0
