"""Clause-swap negatives: a caption with one observable field's value replaced by another.

With `loss.clause_negatives`, the matching loss also ranks each image's caption above the same
caption in which one field the pixels can show (`caption.OBSERVABLE_FIELDS`) states another value
of that field (`losses.matching`). That asks the fusion path to notice a single wrong clause,
which is what SCIO's screening asks of the match probability. The values come from a
`values.ValuePool` sampled once from the training records.
"""

from __future__ import annotations

import numpy as np

from klip.data import caption as caption_lib
from klip.data import text as text_lib
from klip.data import values as values_lib


def swap(pool: values_lib.ValuePool, st: text_lib.StructuredText, rng: np.random.Generator,
         skip: int = -1, visible: set[int] | None = None) -> text_lib.StructuredText | None:
  """`st` with one observable clause (not `skip`; among `visible` if given, e.g. the clauses
  whose value is not cut off by max_len) given another value of its field, chosen uniformly;
  None if no such clause has another value."""
  choices = [k for k, name in enumerate(st.field_names)
             if name in caption_lib.OBSERVABLE_FIELDS and k != skip
             and (visible is None or k in visible) and len(pool.distinct(st.family, name)) > 1]
  if not choices:
    return None
  k = choices[int(rng.integers(len(choices)))]
  others = [v for v in pool.distinct(st.family, st.field_names[k]) if v != st.values[k]]
  values = list(st.values)
  values[k] = others[int(rng.integers(len(others)))]
  return text_lib.compose(st.family, values)
