"""An evaluator with known behaviour for the eval-job tests (`type="tests.eval_fakes"`; the
`behaviour` kwarg picks what it does)."""

import numpy as np

from evals import stats


class Evaluator:
  """behaviour: "ok" (yields the checkpoint step and a mean with an interval), "raise",
  or "missing" (opens a dataset key the config does not prepare)."""

  def __init__(self, predictor, datasets, *, behaviour="ok", data="synthetic", split="test",
               max_examples=None):
    self.predictor, self.datasets = predictor, datasets
    self.behaviour, self.data, self.split = behaviour, data, split

  def run(self, artifacts):
    if self.behaviour == "raise":
      raise ZeroDivisionError("planted failure")
    split = self.datasets.split(self.data, self.split)
    artifacts.text(f"{len(split)} examples")
    yield "step", float(self.predictor.step)
    yield from stats.with_ci("score", np.linspace(0.0, 1.0, len(split)))
