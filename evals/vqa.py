"""Visual question answering over the structured fields of the synthetic corpus.

Every question type of `evals.answers` (count, category, position, landform, function) is
asked of every chip of `split` that has ground truth for it and answered closed-set: the
one-clause candidate text that `scorer` ranks first (see `evals.answers`). Metrics, per type
and pooled over all questions: `accuracy` with its 95 % bootstrap interval, `chance` (the
accuracy of a uniform guess among the candidates) and the number of `questions`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from evals import answers as answers_lib
from evals import stats

EXAMPLES = 3  # questions per type shown in the report


def _words(answers: frozenset) -> str:
  return " / ".join(str(a).replace("_", " ") for a in sorted(answers))


class Evaluator:
  """VQA accuracy on `split` of dataset `data`, candidates from `answers_split` and `split`."""

  def __init__(self, predictor, datasets, *, data: str, split: str, answers_split: str,
               scorer: str = "match", max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data, self.split, self.answers_split = data, split, answers_split
    self.scorer = scorer
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    split = self.datasets.split(self.data, self.split, max_examples=self.max_examples)
    reference = self.datasets.split(self.data, self.answers_split)
    side = answers_lib.images(self.predictor, split)
    ids = split.ids
    correct, chance, table, examples = [], [], [], []
    for name, question in answers_lib.QUESTIONS.items():
      result = answers_lib.ask(self.predictor, question, split, reference, side,
                               self.scorer)
      if result is None:
        artifacts.text(f"No `{name}` questions: no chip of {self.data}:{self.split} has its "
                       "ground truth.")
        continue
      metrics = stats.with_ci(f"{name}/accuracy", result.correct)
      (_, accuracy), (_, low), (_, high) = metrics
      yield from metrics
      yield f"{name}/chance", float(result.chance.mean())
      yield f"{name}/questions", float(len(result.rows))
      correct.append(result.correct)
      chance.append(result.chance)
      table.append((name, question.prompt, len(result.rows), len(result.options),
                    accuracy, f"[{low:.3f}, {high:.3f}]", float(result.chance.mean())))
      for row, right, predicted in list(zip(result.rows, result.right,
                                            result.predicted))[:EXAMPLES]:
        examples.append((ids[row], question.prompt, _words(right), _words({predicted}),
                         "yes" if predicted in right else "no"))
    if not correct:
      raise ValueError(f"{self.data}:{self.split} has no chip with ground truth to ask about")
    yield from stats.with_ci("accuracy", np.concatenate(correct))
    yield "chance", float(np.concatenate(chance).mean())
    yield "questions", float(sum(len(c) for c in correct))
    artifacts.table("accuracy per question type",
                    ("type", "question", "questions", "candidates", "accuracy", "95 % CI",
                     "chance"), table)
    artifacts.table("examples", ("chip", "question", "true", "answer", "right"), examples)
    artifacts.text("Candidates: the distinct true answers of the "
                   f"`{self.answers_split}` and `{self.split}` splits, each written as one "
                   f"caption clause; the answer is the one the {self.scorer!r} scorer ranks "
                   "first.")
