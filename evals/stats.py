"""Confidence intervals for evaluation metrics (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 1000
SEED = 0


def bootstrap_ci(per_example: np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                 *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED
                 ) -> tuple[float, float, float]:
  """(statistic, low, high): the percentile bootstrap interval over examples (rows).

  `per_example` is [N] or [N, ...] (rows are resampled together, e.g. (prediction, target)
  pairs for a statistic that is not a mean). Fixed seed: the same inputs give the same interval.
  A resample on which the statistic is undefined (NaN, e.g. a mAP over a resample that drew no
  ground-truth box) is left out of the interval; the interval is NaN only if all are.
  """
  x = np.asarray(per_example)
  if x.shape[0] == 0:
    raise ValueError("bootstrap over no examples")
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))
  values = np.array([statistic(x[r]) for r in rows], np.float64)
  alpha = (1.0 - level) / 2.0
  defined = values[~np.isnan(values)]
  low, high = (np.quantile(defined, [alpha, 1.0 - alpha]) if defined.size
               else (float("nan"), float("nan")))
  return float(statistic(x)), float(low), float(high)


def with_ci(name: str, per_example: np.ndarray,
            statistic: Callable[[np.ndarray], float] = np.mean):
  """(name, value) pairs of a metric and its 95 % bootstrap interval: NAME, NAME/ci_low,
  NAME/ci_high; the report prints them as `value [low, high]`."""
  value, low, high = bootstrap_ci(per_example, statistic)
  return [(name, value), (f"{name}/ci_low", low), (f"{name}/ci_high", high)]
