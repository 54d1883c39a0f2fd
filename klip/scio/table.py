"""The SCIO pair table: what the rescoring pass decided about each training pair.

Keyed by example: row i is record i of the training split, and the row stores that record's
example id, which is checked against the dataset whenever the table is loaded or joined to an
example (`TableMismatchError`), so table and data never silently misalign. Per pair:

  dropped          clause left out of the training caption (-1: none)
  rewrites         {clause: value} replacing field values (reconstruct stage)
  weight           per-pair loss weight
  scores           last (cosine, match) of the full caption and of the kept caption
  scored_version   table version of the pass that last scored the pair (-1: never)

`version` counts rescoring passes. The table is JSON-compatible (`to_json` / `from_json`) and
is saved as an item of the model's Orbax step. A table written by another schema version is
refused with `TableSchemaError` (no migration: there is one schema so far).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klip.data import schema
from klip.data import text as text_lib

SCHEMA_VERSION = 1
SCORE_COLUMNS = ("cosine_full", "match_full", "cosine_kept", "match_kept")
_CHECKED_IDS = 64  # ids compared against the dataset on load (evenly spaced, plus the last)


class TableMismatchError(schema.RecordMismatch):
  """The pair table does not belong to this dataset (name, size or example ids differ)."""


class TableSchemaError(ValueError):
  """The pair table was written by another schema version."""


def read_ids(source) -> tuple[str, ...]:
  """Example ids of every record of a split, in record order."""
  return tuple(schema.example_id(source[i]) for i in range(len(source)))


def rewritten(st: text_lib.StructuredText, rewrites: dict[int, str]) -> text_lib.StructuredText:
  """`st` with the field values in `rewrites` replaced (the caption composed again)."""
  if not rewrites:
    return st
  values = list(st.values)
  for clause, value in rewrites.items():
    if not 0 <= clause < len(values):
      raise ValueError(f"rewrite of clause {clause}, but the caption has {len(values)} clauses")
    values[clause] = value
  return text_lib.compose(st.family, values)


@dataclasses.dataclass(frozen=True, eq=False)
class TableView:
  """What the input pipeline needs of a table: small, picklable, read-only."""
  version: int
  ids: np.ndarray       # str [N]
  dropped: np.ndarray   # int32 [N]
  weight: np.ndarray    # float32 [N]
  rewrites: dict[int, dict[int, str]]

  def apply(self, index: int, record_id: str,
            st: text_lib.StructuredText) -> tuple[text_lib.StructuredText, int, float]:
    """(structured text with rewrites, clause to skip or -1, weight) of record `index`."""
    if not 0 <= index < len(self.ids) or self.ids[index] != record_id:
      expected = self.ids[index] if 0 <= index < len(self.ids) else "<out of range>"
      raise TableMismatchError(f"record {index} has id {record_id!r} but the pair table "
                               f"(version {self.version}) expects {expected!r}")
    return (rewritten(st, self.rewrites.get(index, {})), int(self.dropped[index]),
            float(self.weight[index]))


@dataclasses.dataclass
class PairTable:
  """The versioned pair table of one training split (see the module docstring)."""
  dataset: str
  version: int
  ids: tuple[str, ...]
  dropped: np.ndarray          # int32 [N]
  weight: np.ndarray           # float32 [N]
  scores: np.ndarray           # float32 [N, 4], columns SCORE_COLUMNS
  scored_version: np.ndarray   # int32 [N]
  rewrites: dict[int, dict[int, str]]

  @classmethod
  def initial(cls, dataset: str, ids: tuple[str, ...]) -> PairTable:
    """Version 0: nothing dropped or rewritten, weight 1, never scored."""
    n = len(ids)
    return cls(dataset=dataset, version=0, ids=tuple(ids),
               dropped=np.full(n, -1, np.int32), weight=np.ones(n, np.float32),
               scores=np.zeros((n, len(SCORE_COLUMNS)), np.float32),
               scored_version=np.full(n, -1, np.int32), rewrites={})

  def __len__(self) -> int:
    return len(self.ids)

  def copy(self) -> PairTable:
    return dataclasses.replace(
        self, dropped=self.dropped.copy(), weight=self.weight.copy(), scores=self.scores.copy(),
        scored_version=self.scored_version.copy(),
        rewrites={i: dict(r) for i, r in self.rewrites.items()})

  def view(self) -> TableView:
    return TableView(version=self.version, ids=np.asarray(self.ids, dtype=str),
                     dropped=self.dropped.copy(), weight=self.weight.copy(),
                     rewrites={i: dict(r) for i, r in self.rewrites.items()})

  def check(self, dataset: str, source) -> None:
    """Raises TableMismatchError unless the table belongs to `dataset` as read by `source`."""
    if dataset != self.dataset:
      raise TableMismatchError(f"pair table of dataset {self.dataset!r}, not {dataset!r}")
    if len(source) != len(self):
      raise TableMismatchError(f"pair table of {self.dataset!r} has {len(self)} rows but the "
                               f"dataset has {len(source)} records")
    n = len(self)
    rows = sorted(set(np.linspace(0, n - 1, min(n, _CHECKED_IDS)).astype(int).tolist()))
    for i in rows:
      got = schema.example_id(source[i])
      if got != self.ids[i]:
        raise TableMismatchError(f"pair table row {i} is example {self.ids[i]!r} but record "
                                 f"{i} of {dataset!r} is {got!r}")

  def to_json(self) -> dict:
    return {
        "schema": SCHEMA_VERSION, "dataset": self.dataset, "version": self.version,
        "ids": list(self.ids), "dropped": self.dropped.tolist(),
        "weight": [float(w) for w in self.weight],
        "scores": {c: [float(v) for v in self.scores[:, j]]
                   for j, c in enumerate(SCORE_COLUMNS)},
        "scored_version": self.scored_version.tolist(),
        "rewrites": [[i, k, v] for i in sorted(self.rewrites)
                     for k, v in sorted(self.rewrites[i].items())],
    }

  @classmethod
  def from_json(cls, data: dict) -> PairTable:
    got = data.get("schema")
    if got != SCHEMA_VERSION:
      raise TableSchemaError(
          f"pair table schema version {got!r}, this code reads version {SCHEMA_VERSION}; "
          "there is no migration: resume from a checkpoint written by this version, or start "
          "a new run")
    ids = tuple(data["ids"])
    n = len(ids)
    columns = [data["dropped"], data["weight"], data["scored_version"],
               *(data["scores"][c] for c in SCORE_COLUMNS)]
    if any(len(c) != n for c in columns):
      raise TableSchemaError(f"pair table columns disagree in length with its {n} ids")
    rewrites: dict[int, dict[int, str]] = {}
    for i, k, v in data["rewrites"]:
      rewrites.setdefault(int(i), {})[int(k)] = str(v)
    return cls(dataset=data["dataset"], version=int(data["version"]), ids=ids,
               dropped=np.asarray(data["dropped"], np.int32),
               weight=np.asarray(data["weight"], np.float32),
               scores=np.stack([np.asarray(data["scores"][c], np.float32)
                                for c in SCORE_COLUMNS], axis=1).reshape(n, -1),
               scored_version=np.asarray(data["scored_version"], np.int32),
               rewrites=rewrites)
