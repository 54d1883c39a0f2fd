"""The values each caption field takes across a pair table: candidates for reconstruction.

SCIO's reconstruct stage refills a flagged value span with the decoder's own generation; with
`scio.fill_candidates` = N > 0 it also offers the decoder the field's N most frequent other
values in the table, and the decoder's log-likelihood of each whole caption picks among them
(`rescore.run_pass`). The pool is counted over the source's captions as written (the same for
every pass, so a resumed run sees the same candidates).
"""

from __future__ import annotations

import collections

from klip.data import schema
from klip.data import text as text_lib


class ValuePool:
  """Value counts per (family, clause index)."""

  def __init__(self, counts: dict[tuple[str, int], collections.Counter]):
    self._ranked = {key: [v for v, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
                    for key, c in counts.items()}

  @classmethod
  def from_texts(cls, texts) -> ValuePool:
    counts = collections.defaultdict(collections.Counter)
    for st in texts:
      for k, value in enumerate(st.values):
        counts[(st.family, k)][value] += 1
    return cls(dict(counts))

  @classmethod
  def from_source(cls, source) -> ValuePool:
    """Counts the captions of every record of `source` (the pair table's dataset)."""
    return cls.from_texts(schema.structured_text(source[i]) for i in range(len(source)))

  def others(self, st: text_lib.StructuredText, k: int, n: int,
             exclude: tuple[str, ...] = ()) -> list[str]:
    """Up to n values of clause k of `st`'s family, most frequent first, other than its own
    value and `exclude`."""
    skip = {st.values[k], *exclude}
    return [v for v in self._ranked.get((st.family, k), []) if v not in skip][:n]
