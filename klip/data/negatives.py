"""Clause-swap negatives: a caption with one observable field's value replaced by another.

With `loss.clause_negatives`, the matching loss also ranks each image's caption above the same
caption in which one field the pixels can show (`caption.OBSERVABLE_FIELDS`) states another value
of that field (`losses.matching`). That asks the fusion path to notice a single wrong clause,
which is what SCIO's screening asks of the match probability. The values come from a `ValuePool` collected once from
the training records (plain data, so it pickles to Grain workers).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klip.data import caption as caption_lib
from klip.data import schema
from klip.data import text as text_lib


@dataclasses.dataclass(frozen=True)
class ValuePool:
  """The distinct values of each (family, observable field), sorted."""
  values: dict[tuple[str, str], tuple[str, ...]]

  @classmethod
  def collect(cls, source, max_records: int = 5000) -> ValuePool:
    """Values of up to `max_records` records spread evenly over `source` (unreadable records
    are passed over). Raises ValueError if no record could be read."""
    n = len(source)
    rows = np.unique(np.linspace(0, n - 1, min(n, max_records)).astype(int)) if n else []
    found: dict[tuple[str, str], set[str]] = {}
    read = 0
    for i in rows:
      try:
        st = schema.structured_text(source[int(i)])
      except Exception:  # pylint: disable=broad-except  # counted below; the pipeline logs it
        continue
      read += 1
      for name, value in zip(st.field_names, st.values):
        if name in caption_lib.OBSERVABLE_FIELDS:
          found.setdefault((st.family, name), set()).add(value)
    if not read:
      raise ValueError(f"no readable record among the {len(rows)} sampled for clause negatives")
    return cls({key: tuple(sorted(v)) for key, v in found.items()})

  def swap(self, st: text_lib.StructuredText, rng: np.random.Generator, skip: int = -1,
           visible: set[int] | None = None) -> text_lib.StructuredText | None:
    """`st` with one observable clause (not `skip`; among `visible` if given, e.g. the clauses
    whose value is not cut off by max_len) given another value of its field, chosen uniformly;
    None if no such clause has another value."""
    choices = [k for k, name in enumerate(st.field_names)
               if k != skip and (visible is None or k in visible)
               and len(self.values.get((st.family, name), ())) > 1]
    if not choices:
      return None
    k = choices[int(rng.integers(len(choices)))]
    others = [v for v in self.values[(st.family, st.field_names[k])] if v != st.values[k]]
    values = list(st.values)
    values[k] = others[int(rng.integers(len(others)))]
    return text_lib.compose(st.family, values)
