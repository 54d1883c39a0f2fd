"""The eight-field clause structure of a caption (method.md §1).

A caption is the eight field values of a chip's family joined as clauses; each clause is a
fixed template prefix followed by a *value span*, clauses are separated by SEPARATOR. The
character offsets of every value span are kept so that tokenization can mark value-span tokens
exactly (the reconstruct objective and SCIO operate on value spans).
"""

from __future__ import annotations

import dataclasses

from klip.data import caption as caption_lib
from klip.data.caption import PREFIXES, SEPARATOR



@dataclasses.dataclass(frozen=True)
class StructuredText:
  """Eight field values and the caption made from them.

  spans[i] = (start, end) character offsets of values[i] inside caption.
  """
  family: str
  values: tuple[str, ...]
  caption: str
  spans: tuple[tuple[int, int], ...]

  @property
  def field_names(self) -> tuple[str, ...]:
    return caption_lib.FAMILIES[self.family]

  def segments(self) -> list[tuple[str, int]]:
    """The caption cut into (text, clause index) pieces; -1 marks template text.

    Concatenating the texts gives the caption back; tokenizing each piece separately makes
    value-span token positions exact.
    """
    out = []
    cursor = 0
    for i, (start, end) in enumerate(self.spans):
      out.append((self.caption[cursor:start], -1))
      out.append((self.caption[start:end], i))
      cursor = end
    if cursor < len(self.caption):
      out.append((self.caption[cursor:], -1))
    return [(t, i) for t, i in out if t]


def compose(family: str, values: tuple[str, ...] | list[str]) -> StructuredText:
  """Joins eight field values into a caption and records each value span."""
  names = caption_lib.FAMILIES[family]
  values = tuple(str(v).strip() for v in values)
  if len(values) != len(names):
    raise ValueError(f"{family} family needs {len(names)} field values {names}, got {len(values)}")
  parts, spans, cursor = [], [], 0
  for i, (name, value) in enumerate(zip(names, values)):
    if not value:
      raise ValueError(f"field {name!r} has an empty value")
    if SEPARATOR.strip() in value:
      raise ValueError(f"field {name!r} value {value!r} contains the separator")
    clause_prefix = (SEPARATOR if i else "") + PREFIXES[name]
    start = cursor + len(clause_prefix)
    parts.append(clause_prefix + value)
    spans.append((start, start + len(value)))
    cursor = start + len(value)
  return StructuredText(family, values, "".join(parts), tuple(spans))


# Fields whose values name image positions (chip.GRID_NAMES, "towards the top left").
POSITION_FIELDS = ("location", "layout")
_VERTICAL_MIRROR = {"top": "bottom", "bottom": "top"}


def flip_vertical(st: StructuredText) -> StructuredText:
  """The text of the image mirrored top to bottom: "top" and "bottom" swapped in the position
  fields, every other field as it was (left, right and centre stay where they are)."""
  values = tuple(
      " ".join(_VERTICAL_MIRROR.get(w, w) for w in v.split(" ")) if name in POSITION_FIELDS
      else v for name, v in zip(st.field_names, st.values))
  return st if values == st.values else compose(st.family, values)
