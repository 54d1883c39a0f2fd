"""The values each caption field takes over a set of captions: one pool, several users.

Clause-swap negatives and clause rivals (`klip/data/negatives.py`, `loss.clause_negatives`,
`loss.clause_rivals`) give an observable field other values, drawn uniformly from the distinct
ones; SCIO's clause screen and reconstruct stage (`klip/scio/clauses.py`, `klip/scio/rescore.py`)
try a field's most frequent other values. All read the same counts, keyed by (caption family,
field name). "Other" means other in content (`klip/data/content.py`): a rewording of the
clause's own value ("three ships" for "3") is never offered, since it is not a wrong value.
Plain data, so a pool pickles to Grain workers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np

from klip.data import content as content_lib
from klip.data import schema
from klip.data import text as text_lib


@dataclasses.dataclass(frozen=True)
class ValuePool:
  """How often each value of each (family, field name) occurs."""
  counts: dict[tuple[str, str], dict[str, int]]

  @classmethod
  def from_texts(cls, texts) -> ValuePool:
    counts = collections.defaultdict(collections.Counter)
    for st in texts:
      for name, value in zip(st.field_names, st.values):
        counts[(st.family, name)][value] += 1
    return cls({key: dict(c) for key, c in counts.items()})

  @classmethod
  def from_source(cls, source, rows: range | None = None) -> ValuePool:
    """Counts the captions of records `rows` of `source` (default every record; an unreadable
    record raises)."""
    rows = range(len(source)) if rows is None else rows
    return cls.from_texts(schema.structured_text(source[i]) for i in rows)

  def to_rows(self) -> list[list]:
    """[[family, field name, value, count], ...]: the counts as JSON-compatible rows."""
    return [[family, name, value, count] for (family, name), counts in self.counts.items()
            for value, count in counts.items()]

  @classmethod
  def from_rows(cls, rows) -> ValuePool:
    """The pool of `to_rows` rows, counts of the same value summed (pools counted over parts
    of a split, e.g. by several processes, merge into the split's)."""
    counts = collections.defaultdict(collections.Counter)
    for family, name, value, count in rows:
      counts[(family, name)][value] += int(count)
    return cls({key: dict(c) for key, c in counts.items()})

  @classmethod
  def sample(cls, source, max_records: int = 5000) -> ValuePool:
    """Counts up to `max_records` records spread evenly over `source`; unreadable records are
    passed over (the pipeline logs them). Raises ValueError if no record could be read."""
    n = len(source)
    rows = np.unique(np.linspace(0, n - 1, min(n, max_records)).astype(int)) if n else []
    texts = []
    for i in rows:
      try:
        texts.append(schema.structured_text(source[int(i)]))
      except Exception:  # pylint: disable=broad-except  # counted below; the pipeline logs it
        continue
    if not texts:
      raise ValueError(f"no readable record among the {len(rows)} sampled for the value pool")
    return cls.from_texts(texts)

  @functools.cached_property
  def _distinct(self) -> dict[tuple[str, str], tuple[str, ...]]:
    return {key: tuple(sorted(c)) for key, c in self.counts.items()}

  @functools.cached_property
  def _ranked(self) -> dict[tuple[str, str], tuple[str, ...]]:
    return {key: tuple(v for v, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
            for key, c in self.counts.items()}

  def distinct(self, family: str, name: str) -> tuple[str, ...]:
    """The values of field `name` in `family` captions, sorted."""
    return self._distinct.get((family, name), ())

  @functools.cached_property
  def _content(self) -> dict[tuple[str, str], dict[str, str]]:
    return {(family, name): {v: content_lib.content(name, v) for v in c}
            for (family, name), c in self.counts.items()}

  def has_alternative(self, family: str, name: str, value: str) -> bool:
    """Whether field `name` of `family` has a value whose content differs from `value`'s."""
    said = content_lib.content(name, value)
    return any(c != said for c in self._content.get((family, name), {}).values())

  def alternatives(self, family: str, name: str, value: str) -> list[str]:
    """The values of field `name` in `family` captions whose content differs from `value`'s,
    sorted."""
    contents = self._content.get((family, name), {})
    said = content_lib.content(name, value)
    return [v for v in self.distinct(family, name) if contents[v] != said]

  def others(self, st: text_lib.StructuredText, k: int, n: int,
             exclude: tuple[str, ...] = ()) -> list[str]:
    """Up to n values of clause k's field in `st`'s family, most frequent first (ties by
    value), whose content differs from its own value's and from each of `exclude`."""
    name = st.field_names[k]
    key = (st.family, name)
    contents = self._content.get(key, {})
    skip = {content_lib.content(name, v) for v in (st.values[k], *exclude)}
    return [v for v in self._ranked.get(key, ()) if contents[v] not in skip][:n]
