"""Closed-set answers to questions about a chip (VQA and counting share this definition).

A question type reads its ground truth from the simulator's metadata in the records, never
from the caption text:

- count (target chips): "How many targets are there?", the true `count`;
- category (target chips): "What are the targets?", the first instance's category;
- position (target chips): "Where is a target?", the 3x3-grid cell (`chip.grid_cell`) of any
  instance (every occupied cell is a right answer: the question stays well posed for chips
  with several targets);
- landform (landform chips): "What is the main landform?", the dominant land-cover class of
  the mask;
- function (landform chips): "What is the regional function?", `region_function`.

Candidates of a question type are the distinct ground-truth answers of the `answers_split`
and of the scored split (so no true answer is unreachable). Each candidate is written into the
clause template of the field that states it, spelled as the HCoT rules writer spells it
(`klip.hcot.rules`): a one-clause text such as "the number of targets is 3" or "the targets
are located at the top left of the image". A candidate with several spellings (a category's
singular and plural noun) scores the mean over them.

The model's answer is the candidate with the highest score (`scorer`): "match", the ITM match
probability with the image, or "decoder", the image-conditioned decoder's log-likelihood of the
candidate text (`klip.predict.text_logprob`: how BLIP ranks closed-set VQA answers; the clause
prefix is common to all candidates, so this ranks the values). Ties go to the higher mean
cosine similarity of the image and text embeddings, and any left to a uniform draw (fixed
seed), so a model that cannot tell the candidates apart scores the chance level: the mean over
questions of (right answers / candidates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from evals import data as data_lib
from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.data import schema
from klip.data.caption import PAD
from klip.data.text import PREFIXES
from klip.hcot import rules

Answer = int | str
TOKEN_BLOCK = 16  # candidate texts are cut to a multiple of this many tokens
SCORERS = ("match", "decoder")


# ----- ground truth ----------------------------------------------------------------------------
def _family(split: data_lib.Split, family: str) -> list[bool]:
  return [f == family for f in split.texts("family")]


def _single(split: data_lib.Split, family: str, values: Sequence[Answer],
            unknown: Sequence[Answer] = ("",)) -> list[frozenset]:
  return [frozenset({v}) if ok and v not in unknown else frozenset()
          for ok, v in zip(_family(split, family), values)]


def _counts(split: data_lib.Split) -> list[frozenset]:
  return _single(split, "target", [int(r["count"]) for r in split.records], unknown=(-1,))


def _categories(split: data_lib.Split) -> list[frozenset]:
  return _single(split, "target", data_lib.labels(split, "category"))


def _cells(split: data_lib.Split) -> list[frozenset]:
  out = []
  for target, r in zip(_family(split, "target"), split.records):
    boxes = np.asarray(r["instance_boxes"], np.float32).reshape(-1, 4)
    if not target or not len(boxes):
      out.append(frozenset())
      continue
    h, w = schema.decode_image(r).shape[:2]
    out.append(frozenset(chip_lib.GRID_NAMES[chip_lib.grid_cell(tuple(b), h, w)]
                         for b in boxes))
  return out


def _landforms(split: data_lib.Split) -> list[frozenset]:
  return _single(split, "landform", data_lib.labels(split, "dominant_landcover"))


def _functions(split: data_lib.Split) -> list[frozenset]:
  return _single(split, "landform", split.texts("region_function"), unknown=("", "unknown"))


# ----- candidate texts -------------------------------------------------------------------------
def _category_texts(category: str) -> tuple[str, ...]:
  nouns = knowledge.objects().categories.get(category)
  names = (nouns.singular, nouns.plural) if nouns else (category.replace("_", " "),)
  return tuple(PREFIXES["category"] + n for n in dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class Question:
  """A question type: its ground truth per record and the clause texts of an answer."""
  name: str
  prompt: str                                       # the question in words (report)
  truth: Callable[[data_lib.Split], list[frozenset]]  # right answers; empty: not asked
  texts: Callable[[Answer], tuple[str, ...]]        # the spellings of a candidate answer


QUESTIONS = {q.name: q for q in (
    Question("count", "How many targets are there?", _counts,
             lambda n: (PREFIXES["count"] + str(n),)),
    Question("category", "What are the targets?", _categories, _category_texts),
    Question("position", "Where is a target?", _cells,
             lambda cell: (PREFIXES["location"] + f"the {cell} of the image",)),
    Question("landform", "What is the main landform?", _landforms,
             lambda cover: (PREFIXES["terrain"] + rules.TERRAIN[cover],)),
    Question("function", "What is the regional function?", _functions,
             lambda function: (PREFIXES["functionality"] + rules.FUNCTION[function],)),
)}


def candidates(question: Question, *splits: data_lib.Split) -> list[Answer]:
  """The sorted distinct right answers of `question` over `splits`."""
  return sorted(frozenset().union(*(a for s in splits for a in question.truth(s))))


# ----- answering -------------------------------------------------------------------------------
def choose(score: np.ndarray, cosine: np.ndarray, *, seed: int = 0) -> np.ndarray:
  """Index [N] of each row's answer among K candidates: the highest score [N, K], ties by
  the higher cosine [N, K], then uniformly at random (fixed seed)."""
  draw = np.random.default_rng(seed).random(score.shape)
  return np.lexsort((draw, cosine, score), axis=-1)[:, -1]


def trim(tokens: np.ndarray) -> np.ndarray:
  """Tokens [S, L] cut after their longest text, rounded up to TOKEN_BLOCK positions.

  The text tower masks padding and its positions start at 0, so every score is unchanged; a
  one-clause text then costs a fraction of a max_len one.
  """
  used = int(np.flatnonzero((tokens != PAD).any(axis=0)).max()) + 1
  return tokens[:, :min(tokens.shape[1], -(-used // TOKEN_BLOCK) * TOKEN_BLOCK)]


def answer(predictor, question: Question, options: Sequence[Answer], image_tokens: np.ndarray,
           image_embedding: np.ndarray, scorer: str = "match") -> np.ndarray:
  """Index [N] into `options` of the answer to `question` about each of N images, given their
  image tokens [N, 1 + P, W] and unit embeddings [N, E] (one scoring pass per candidate text)."""
  if scorer not in SCORERS:
    raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
  texts = [question.texts(o) for o in options]
  owner = np.repeat(np.arange(len(options)), [len(t) for t in texts])
  tokens = trim(predictor.tokens([t for ts in texts for t in ts]))  # [T, L]
  n = len(image_tokens)
  cosine = image_embedding @ predictor.embed_texts(tokens).T  # [N, T]
  score_fn = predictor.match_prob if scorer == "match" else predictor.text_logprob
  score = np.stack([score_fn(image_tokens, np.repeat(t[None], n, axis=0)) for t in tokens],
                   axis=1)
  return choose(_group_mean(score, owner, len(options)),
                _group_mean(cosine, owner, len(options)))


def _group_mean(x: np.ndarray, owner: np.ndarray, k: int) -> np.ndarray:
  """[N, K]: the mean of the columns of x [N, T] that each of K candidates owns."""
  return np.stack([x[:, owner == j].mean(axis=1) for j in range(k)], axis=1)


class Images(NamedTuple):
  """The image side of answering, for every record of a split."""
  tokens: np.ndarray     # [N, 1 + P, W]
  embedding: np.ndarray  # [N, E]


def images(predictor, split: data_lib.Split) -> Images:
  return Images(predictor.split_image_tokens(split), predictor.split_features(split).embedding)


class Answers(NamedTuple):
  """The answers to one question type over the records of a split where it is asked."""
  rows: np.ndarray          # [Q] record indices
  right: list[frozenset]    # [Q] right answers
  options: list[Answer]     # the K candidates
  predicted: list[Answer]   # [Q]

  @property
  def correct(self) -> np.ndarray:
    return np.array([p in r for p, r in zip(self.predicted, self.right)], np.float64)

  @property
  def chance(self) -> np.ndarray:
    """[Q] the accuracy of a uniform guess among the candidates."""
    return np.array([len(r) / len(self.options) for r in self.right], np.float64)


def ask(predictor, question: Question, split: data_lib.Split, reference: data_lib.Split,
        side: Images, scorer: str = "match") -> Answers | None:
  """`question` answered about every record of `split` that has ground truth for it, the
  candidates taken from `reference` and `split` and ranked by `scorer`; None when no record
  has."""
  truth = question.truth(split)
  rows = np.array([i for i, a in enumerate(truth) if a], np.int64)
  if not rows.size:
    return None
  options = candidates(question, reference, split)
  index = answer(predictor, question, options, side.tokens[rows], side.embedding[rows], scorer)
  return Answers(rows, [truth[i] for i in rows], options, [options[i] for i in index])
