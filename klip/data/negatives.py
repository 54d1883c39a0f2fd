"""Negatives made by giving an observable field another of its values.

Clause-swap negatives (`loss.clause_negatives`): the matching loss also ranks each image's
caption above the same caption in which one field the pixels can show
(`caption.OBSERVABLE_FIELDS`) states another value of that field (`losses.matching`). That asks
the fusion path to notice a single wrong clause, which is what SCIO's screening asks of the
match probability.

Clause rivals (`loss.clause_rivals`): the clause an image is contrasted with alone ("the targets
are classified as ship") is also ranked above the same clause with other values of its field
(`losses.clause_rivals`): the choice a zero-shot classifier and SCIO's clause screen ask of the
image, which the in-batch clause contrast rarely poses (its negatives are mostly other fields'
clauses). The values come from a `values.ValuePool` sampled once from the training records.
"""

from __future__ import annotations

import numpy as np

from klip.data import caption as caption_lib
from klip.data import text as text_lib
from klip.data import values as values_lib


def swap(pool: values_lib.ValuePool, st: text_lib.StructuredText, rng: np.random.Generator,
         skip: int = -1, visible: set[int] | None = None) -> text_lib.StructuredText | None:
  """`st` with one observable clause (not `skip`; among `visible` if given, e.g. the clauses
  whose value is not cut off by max_len) given another value of its field (other in content,
  `ValuePool.alternatives`), chosen uniformly; None if no such clause has another value."""
  choices = [k for k, name in enumerate(st.field_names)
             if name in caption_lib.OBSERVABLE_FIELDS and k != skip
             and (visible is None or k in visible)
             and pool.has_alternative(st.family, name, st.values[k])]
  if not choices:
    return None
  k = choices[int(rng.integers(len(choices)))]
  others = pool.alternatives(st.family, st.field_names[k], st.values[k])
  values = list(st.values)
  values[k] = others[int(rng.integers(len(others)))]
  return text_lib.compose(st.family, values)


def rivals(pool: values_lib.ValuePool, st: text_lib.StructuredText, k: int, n: int,
           rng: np.random.Generator) -> list[str]:
  """Up to n distinct other values of clause k's field (other in content,
  `ValuePool.alternatives`), drawn uniformly without replacement."""
  others = pool.alternatives(st.family, st.field_names[k], st.values[k])
  if len(others) <= n:
    return others
  return [others[int(i)] for i in rng.choice(len(others), n, replace=False)]
