"""VQA and counting: ground truth, the closed-set answer maths, count metrics, both evaluators."""

import os
import re

import numpy as np
import pytest

from evals import answers
from evals import artifacts as artifacts_lib
from evals import counting
from evals import data as data_lib
from evals import vqa
from evals.predictor import ImageFeatures
from klip.data import knowledge
from klip.data import schema
from klip.data.caption import ENC, PAD
from klip.data.text import PREFIXES
from klip.hcot import rules


class FakePredictor:
  """Predictions of a lookup: `prob` maps (image, text) pairs to their match probability
  (`default` for the others).

  An image is its row in `records` and its embedding that row number; a text is its index in
  a vocabulary grown as texts are tokenized, and its embedding that index.
  """

  def __init__(self, records=(), prob=None, default=0.1):
    self.rows = {schema.text_of(r["id"]): i for i, r in enumerate(records)}
    self.prob = prob or {}
    self.default = default
    self.vocab: list[str] = []

  def images(self, records):
    return np.array([self.rows[schema.text_of(r["id"])] for r in records])

  def split_image_tokens(self, split):
    return self.images(split.records)

  def split_features(self, split):
    n = len(split)
    return ImageFeatures(np.arange(n, dtype=np.float64)[:, None], None, None)

  def tokens(self, texts):
    out = np.full((len(texts), 40), PAD, np.int32)
    out[:, 0] = ENC
    for i, t in enumerate(texts):
      if t not in self.vocab:
        self.vocab.append(t)
      out[i, 1] = 10 + self.vocab.index(t)
    return out

  def _text(self, token_row):
    return self.vocab[token_row[1] - 10]

  def embed_texts(self, tokens):
    return np.array([[self.vocab.index(self._text(t))] for t in tokens], np.float64)

  def match_prob(self, image_tokens, tokens):
    return np.array([self.prob.get((int(i), self._text(t)), self.default)
                     for i, t in zip(image_tokens, tokens)])


def _split(records, split="test"):
  return data_lib.Split("synthetic", "synthetic/fake", split, list(records))


def _target(i, count):
  return {"id": f"fake-{i}".encode(), "family": b"target", "count": count}


# ----- the answer maths --------------------------------------------------------------------------
def test_choose_prob_then_cosine_then_uniform():
  prob = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.1], [0.3, 0.3, 0.3]])
  cosine = np.array([[0.9, 0.0, 0.0], [0.1, 0.2, 0.9], [0.0, 0.0, 0.5]])
  np.testing.assert_array_equal(answers.choose(prob, cosine), [1, 1, 2])
  # complete ties: a uniform draw, the same on every call
  ties = np.zeros((8000, 4))
  picks = answers.choose(ties, ties)
  np.testing.assert_array_equal(picks, answers.choose(ties, ties))
  np.testing.assert_allclose(np.bincount(picks, minlength=4) / len(picks), 0.25, atol=0.02)


def test_answer_finds_the_matching_candidate():
  options = [1, 2, 3, 4]
  question = answers.QUESTIONS["count"]
  truth = [3, 1, 4, 4, 2]
  prob = {(i, question.texts(t)[0]): 0.9 for i, t in enumerate(truth)}
  pred = answers.answer(FakePredictor(prob=prob), question, options,
                        np.arange(len(truth)), np.zeros((len(truth), 1)))
  np.testing.assert_array_equal([options[i] for i in pred], truth)


def test_the_decoder_scorer_ranks_by_text_logprob():
  options = [1, 2, 3, 4]
  question = answers.QUESTIONS["count"]
  truth = [2, 4, 1]
  # log-likelihoods: the true text is likeliest; the match head would say otherwise
  fake = FakePredictor(prob={(i, question.texts(o)[0]): 0.9 for i in range(3) for o in (3,)})
  logp = {(i, question.texts(t)[0]): -1.0 for i, t in enumerate(truth)}
  text = fake._text  # pylint: disable=protected-access
  fake.text_logprob = lambda image_tokens, tokens: np.array(
      [logp.get((int(i), text(t)), -5.0) for i, t in zip(image_tokens, tokens)])
  pred = answers.answer(fake, question, options, np.arange(3), np.zeros((3, 1)),
                        scorer="decoder")
  np.testing.assert_array_equal([options[i] for i in pred], truth)
  pred = answers.answer(fake, question, options, np.arange(3), np.zeros((3, 1)))
  np.testing.assert_array_equal([options[i] for i in pred], [3, 3, 3])
  with pytest.raises(ValueError, match="scorer"):
    answers.answer(fake, question, options, np.arange(3), np.zeros((3, 1)), scorer="vote")


def test_answer_averages_spellings_and_breaks_ties_by_cosine():
  question = answers.QUESTIONS["category"]
  ship, tank = question.texts("ship"), question.texts("storage_tank")
  assert len(ship) == 2 and ship[0].endswith(" ship") and ship[1].endswith(" ships")
  # "ship" spellings 0.9 and 0.1 (mean 0.5, max 0.9), "storage tank" 0.6 and 0.6: the mean
  # decides
  prob = {(0, ship[0]): 0.9, (0, ship[1]): 0.1, (0, tank[0]): 0.6, (0, tank[1]): 0.6}
  pred = answers.answer(FakePredictor(prob=prob), question, ["ship", "storage_tank"],
                        np.array([0]), np.zeros((1, 1)))
  assert pred.tolist() == [1]
  # equal probabilities: the candidate whose texts are nearer the image wins; the fake's
  # text embedding is the text's vocabulary index, image embedding 1 favours later texts
  pred = answers.answer(FakePredictor(), question, ["ship", "storage_tank"], np.array([0]),
                        np.ones((1, 1)))
  assert pred.tolist() == [1]
  pred = answers.answer(FakePredictor(), question, ["ship", "storage_tank"], np.array([0]),
                        -np.ones((1, 1)))
  assert pred.tolist() == [0]


def test_constant_predictor_scores_chance():
  """Every true count is the first candidate: only a fair tie-break keeps a blind model at
  chance (a first-candidate tie-break would score 1.0)."""
  test = _split([_target(i, 1) for i in range(4000)])
  reference = _split([_target(i, c) for i, c in enumerate((1, 2, 3, 4))], "val")
  fake = FakePredictor(test.records, default=0.5)
  side = answers.Images(fake.images(test.records), np.zeros((len(test), 1)))
  result = answers.ask(fake, answers.QUESTIONS["count"], test, reference, side)
  assert result.options == [1, 2, 3, 4]
  np.testing.assert_allclose(result.chance, 0.25)
  assert abs(result.correct.mean() - 0.25) < 0.03


def test_candidates_cover_both_splits_and_skip_unknown():
  question = answers.QUESTIONS["count"]
  test = _split([_target(0, 7), _target(1, -1),
                 {"id": b"fake-2", "family": b"landform", "count": 0}])
  reference = _split([_target(3, 2), _target(4, 2)], "val")
  assert [bool(a) for a in question.truth(test)] == [True, False, False]
  assert answers.candidates(question, reference, test) == [2, 7]


def test_trim_keeps_scores(smoke_predictor):
  p = smoke_predictor
  full = p.tokens([answers.QUESTIONS["position"].texts("top left")[0],
                   answers.QUESTIONS["count"].texts(3)[0]])
  short = answers.trim(full)
  assert short.shape[1] % answers.TOKEN_BLOCK == 0 and short.shape[1] < full.shape[1]
  np.testing.assert_array_equal(short, full[:, :short.shape[1]])
  assert np.all(full[:, short.shape[1]:] == PAD)
  image_tokens = p.image_tokens(np.zeros((2, p.image_size, p.image_size,
                                          p.config.model.channels), np.float32))
  np.testing.assert_allclose(p.match_prob(image_tokens, short), p.match_prob(image_tokens, full),
                             atol=1e-5)
  np.testing.assert_allclose(p.embed_texts(short), p.embed_texts(full), atol=1e-5)


# ----- ground truth against what the caption writer wrote -------------------------------------
def _cells_named(value):
  return set(re.split(r", | and ", value.removeprefix("the ").removesuffix(" of the image")))


def test_truth_agrees_with_the_captions(eval_datasets):
  """Each right answer, spelled as its candidate text, is what the rules writer stated."""
  split = eval_datasets.split("synthetic", "test")
  checked = dict.fromkeys(answers.QUESTIONS, 0)
  for name, question in answers.QUESTIONS.items():
    for record, right in zip(split.records, question.truth(split)):
      if not right:
        continue
      fields = dict(zip(map(schema.text_of, record["field_names"]),
                        map(schema.text_of, record["field_values"])))
      uncertain = set(map(schema.text_of, record["text_uncertain"]))
      if name == "count":
        (n,) = right
        assert n == len(record["instance_boxes"])
        assert fields["count"].split()[0] in (str(n), rules.NUMBER_WORDS[n])
      elif name == "category" and "category" not in uncertain:
        (category,) = right
        nouns = knowledge.objects().categories[category]
        value = re.sub(r"^(small|large) ", "", fields["category"])
        assert value in (nouns.singular, nouns.plural)
        assert any(t == PREFIXES["category"] + value for t in question.texts(category))
      elif (name == "position" and "location" not in uncertain
            and not fields["location"].startswith("several")):
        assert _cells_named(fields["location"]) == set(right)
      elif name == "landform":
        (cover,) = right
        (text,) = question.texts(cover)
        assert (PREFIXES["terrain"] + fields["terrain"]).startswith(text + " ")
      elif name == "function":
        (function,) = right
        (text,) = question.texts(function)
        assert (PREFIXES["functionality"] + fields["functionality"]).startswith(text)
      else:
        continue
      checked[name] += 1
  assert all(checked.values()), checked


# ----- counting metrics ------------------------------------------------------------------------
def test_count_scores_hand_values():
  got = dict(counting.scores(np.array([1, 2, 5, 3]), np.array([1, 3, 3, 3])))
  assert got["mae"] == pytest.approx(0.75)
  assert got["accuracy"] == pytest.approx(0.5)
  for name in ("mae", "accuracy"):
    assert got[f"{name}/ci_low"] <= got[name] <= got[f"{name}/ci_high"]
  assert got["mae/ci_low"] >= 0.0 and got["mae/ci_high"] <= 2.0


def test_count_matrix_hand_values():
  m = counting.count_matrix(np.array([1, 2, 5, 3]), np.array([1, 3, 3, 3]),
                            np.array([1, 2, 3, 5]))
  expected = np.zeros((4, 4), np.int64)
  expected[0, 0] = 1                          # true 1 -> 1
  expected[2, 1] = expected[2, 3] = 1         # true 3 -> 2, 3 -> 5
  expected[2, 2] = 1                          # true 3 -> 3
  np.testing.assert_array_equal(m, expected)


# ----- the evaluators end to end ---------------------------------------------------------------
def _oracle(split):
  """A fake predictor that matches exactly the texts of right answers."""
  prob = {(i, t): 1.0 for q in answers.QUESTIONS.values()
          for i, rights in enumerate(q.truth(split)) for a in rights for t in q.texts(a)}
  return FakePredictor(split.records, prob, default=0.0)


def test_evaluators_with_an_oracle_score_perfectly(eval_datasets, tmp_path):
  split = eval_datasets.split("synthetic", "test")
  kwargs = dict(data="synthetic", split="test", answers_split="val")
  metrics = dict(vqa.Evaluator(_oracle(split), eval_datasets, **kwargs).run(
      artifacts_lib.Artifacts(str(tmp_path), "vqa")))
  for name in answers.QUESTIONS:
    assert metrics[f"{name}/accuracy"] == 1.0, name
  assert metrics["accuracy"] == 1.0
  metrics = dict(counting.Evaluator(_oracle(split), eval_datasets, **kwargs).run(
      artifacts_lib.Artifacts(str(tmp_path), "counting")))
  assert metrics["mae"] == 0.0 and metrics["accuracy"] == 1.0


@pytest.fixture(scope="module")
def smoke_results(smoke_predictor, eval_datasets, tmp_path_factory):
  """Both evaluators on the smoke checkpoint: {name: (metrics, artifacts)}."""
  out = {}
  directory = str(tmp_path_factory.mktemp("vqa_artifacts"))
  for name, module in (("vqa", vqa), ("counting", counting)):
    art = artifacts_lib.Artifacts(directory, name)
    evaluator = module.Evaluator(smoke_predictor, eval_datasets, data="synthetic",
                                 split="test", answers_split="val")
    out[name] = (dict(evaluator.run(art)), art)
  return out


def test_vqa_on_the_smoke_checkpoint(smoke_results, eval_datasets):
  metrics, art = smoke_results["vqa"]
  split = eval_datasets.split("synthetic", "test")
  val = eval_datasets.split("synthetic", "val")
  families = split.texts("family")
  total = 0
  for name, question in answers.QUESTIONS.items():
    asked = sum(bool(a) for a in question.truth(split))
    family = "target" if name in ("count", "category", "position") else "landform"
    assert asked == families.count(family) > 0, name
    assert metrics[f"{name}/questions"] == asked
    k = len(answers.candidates(question, val, split))
    if name != "position":  # one right answer each
      assert metrics[f"{name}/chance"] == pytest.approx(1 / k)
    accuracy = [metrics[f"{name}/accuracy{s}"] for s in ("/ci_low", "", "/ci_high")]
    assert 0.0 <= accuracy[0] <= accuracy[1] <= accuracy[2] <= 1.0
    total += asked
  assert metrics["questions"] == total
  pooled = sum(metrics[f"{n}/accuracy"] * metrics[f"{n}/questions"] for n in answers.QUESTIONS)
  assert metrics["accuracy"] == pytest.approx(pooled / total)
  report = "\n".join(art.markdown)
  assert "accuracy per question type" in report and "How many targets are there?" in report
  assert report.count("syn-") >= 3 * len(answers.QUESTIONS)


def test_counting_on_the_smoke_checkpoint(smoke_results, eval_datasets):
  metrics, art = smoke_results["counting"]
  split = eval_datasets.split("synthetic", "test")
  assert metrics["questions"] == split.texts("family").count("target")
  # the same answers as the VQA count question
  assert metrics["accuracy"] == smoke_results["vqa"][0]["count/accuracy"]
  assert metrics["mae"] >= 1.0 - metrics["accuracy"]  # every wrong count is off by >= 1
  assert metrics["mae/ci_low"] <= metrics["mae"] <= metrics["mae/ci_high"]
  assert metrics["mae_median"] > 0.0
  assert os.path.exists(os.path.join(art.directory, "counting_predicted_vs_true_count.png"))


def test_max_examples_caps_the_questions(smoke_predictor, eval_datasets, tmp_path):
  metrics = dict(vqa.Evaluator(smoke_predictor, eval_datasets, data="synthetic", split="test",
                               answers_split="val", max_examples=6).run(
      artifacts_lib.Artifacts(str(tmp_path), "vqa")))
  families = eval_datasets.split("synthetic", "test").texts("family")[:6]
  # three questions about each target chip, two about each landform chip
  assert metrics["questions"] == 3 * families.count("target") + 2 * families.count("landform")
