"""The SCIO pair table: what the rescoring pass decided about each training pair.

Keyed by example: row i is record i of the training split, and the row stores a CRC-32 of that
record's example id, checked against the dataset whenever the table is loaded or joined to an
example (`TableMismatchError`), so table and data never silently misalign. Per pair:

  id_hash          CRC-32 of the example id (uint32)
  dropped          clause left out of the training caption (-1: none)
  weight           per-pair loss weight
  scores           last (cosine, match) of the full caption and of the kept caption
  scored_version   table version of the pass that last scored the pair (-1: never)

and, sparse, `rewrites` {row: {clause: value}} replacing field values (reconstruct stage).
`version` counts rescoring passes.

A table is two parts (`meta` / `columns`, `from_parts`): a small JSON-compatible dict (dataset,
version, row count, rewrites) and one array per column, 32 bytes a row (32 MB at 1M pairs).
The trainer's checkpoint saves the columns as arrays sharded by rows (`klip/checkpoint.py`),
the meta as JSON. `to_json` / `from_json` write and read a whole table as one JSON file (the
`scio.initial_table` of the SCIO benchmark's planted corpora). Schema 1 (string ids, JSON
columns) is read and migrated; other schema versions are refused with `TableSchemaError`.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from klip.data import schema
from klip.data import text as text_lib

SCHEMA_VERSION = 2
SCORE_COLUMNS = ("cosine_full", "match_full", "cosine_kept", "match_kept")
COLUMNS = {"id_hash": np.uint32, "dropped": np.int32, "weight": np.float32,
           "scores": np.float32, "scored_version": np.int32}
_CHECKED_IDS = 64  # ids compared against the dataset on load (evenly spaced, plus the last)


class TableMismatchError(schema.RecordMismatch):
  """The pair table does not belong to this dataset (name, size or example ids differ)."""


class TableSchemaError(ValueError):
  """The pair table was written by another schema version."""


def id_hash(example_id: str) -> int:
  """The CRC-32 of an example id: what a table row stores of it (stable across processes and
  Python versions)."""
  return zlib.crc32(example_id.encode())


def read_id_hashes(source, rows: range | None = None) -> np.ndarray:
  """uint32 [len(rows)]: `id_hash` of records `rows` of a split (default every record)."""
  rows = range(len(source)) if rows is None else rows
  return np.fromiter((id_hash(schema.example_id(source[i])) for i in rows), np.uint32,
                     count=len(rows))


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
  id_hash: np.ndarray   # uint32 [N]
  dropped: np.ndarray   # int32 [N]
  weight: np.ndarray    # float32 [N]
  rewrites: dict[int, dict[int, str]]

  def apply(self, index: int, record_id: str,
            st: text_lib.StructuredText) -> tuple[text_lib.StructuredText, int, float]:
    """(structured text with rewrites, clause to skip or -1, weight) of record `index`."""
    if not 0 <= index < len(self.id_hash) or self.id_hash[index] != id_hash(record_id):
      raise TableMismatchError(
          f"record {index} has id {record_id!r} but the pair table (version {self.version}, "
          f"{len(self.id_hash)} rows) " + (f"expects an id of hash {int(self.id_hash[index])}"
                                           if 0 <= index < len(self.id_hash) else
                                           "has no such row"))
    return (rewritten(st, self.rewrites.get(index, {})), int(self.dropped[index]),
            float(self.weight[index]))


@dataclasses.dataclass
class PairTable:
  """The versioned pair table of one training split (see the module docstring)."""
  dataset: str
  version: int
  id_hash: np.ndarray          # uint32 [N]
  dropped: np.ndarray          # int32 [N]
  weight: np.ndarray           # float32 [N]
  scores: np.ndarray           # float32 [N, 4], columns SCORE_COLUMNS
  scored_version: np.ndarray   # int32 [N]
  rewrites: dict[int, dict[int, str]]

  @classmethod
  def initial(cls, dataset: str, id_hashes: np.ndarray) -> PairTable:
    """Version 0: nothing dropped or rewritten, weight 1, never scored."""
    n = len(id_hashes)
    return cls(dataset=dataset, version=0, id_hash=np.asarray(id_hashes, np.uint32),
               dropped=np.full(n, -1, np.int32), weight=np.ones(n, np.float32),
               scores=np.zeros((n, len(SCORE_COLUMNS)), np.float32),
               scored_version=np.full(n, -1, np.int32), rewrites={})

  def __len__(self) -> int:
    return len(self.id_hash)

  def copy(self) -> PairTable:
    return dataclasses.replace(
        self, **{c: getattr(self, c).copy() for c in COLUMNS},
        rewrites={i: dict(r) for i, r in self.rewrites.items()})

  def view(self) -> TableView:
    return TableView(version=self.version, id_hash=self.id_hash.copy(),
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
      if id_hash(got) != self.id_hash[i]:
        raise TableMismatchError(f"pair table row {i} holds another example (id hash "
                                 f"{int(self.id_hash[i])}) than record {i} of {dataset!r}, "
                                 f"{got!r} (hash {id_hash(got)})")

  def meta(self) -> dict:
    """The JSON-compatible part: schema, dataset, version, row count, rewrites."""
    return {"schema": SCHEMA_VERSION, "dataset": self.dataset, "version": self.version,
            "rows": len(self),
            "rewrites": [[i, k, v] for i in sorted(self.rewrites)
                         for k, v in sorted(self.rewrites[i].items())]}

  def columns(self) -> dict[str, np.ndarray]:
    """The per-row part: one array per column of COLUMNS, rows first."""
    return {c: getattr(self, c) for c in COLUMNS}

  @classmethod
  def from_parts(cls, meta: dict, columns: dict[str, np.ndarray]) -> PairTable:
    """The table of `meta()` and `columns()`; columns may be longer than the table (rows
    padded for sharding) and are cut to its row count."""
    got = meta.get("schema")
    if got != SCHEMA_VERSION:
      raise TableSchemaError(
          f"pair table schema version {got!r}, this code reads version {SCHEMA_VERSION} (and "
          "migrates version 1 JSON); resume from a checkpoint written by this version, or "
          "start a new run")
    n = int(meta["rows"])
    missing = sorted(set(COLUMNS) - set(columns))
    if missing:
      raise TableSchemaError(f"pair table lacks the columns {missing}")
    cut = {}
    for c, dtype in COLUMNS.items():
      x = np.asarray(columns[c])
      if len(x) < n or (c == "scores" and x.shape[1:] != (len(SCORE_COLUMNS),)):
        raise TableSchemaError(f"pair table column {c!r} has shape {x.shape}, expected "
                               f"{n} rows" + (f" of {len(SCORE_COLUMNS)}" if c == "scores"
                                              else ""))
      cut[c] = x[:n].astype(dtype)
    rewrites: dict[int, dict[int, str]] = {}
    for i, k, v in meta["rewrites"]:
      rewrites.setdefault(int(i), {})[int(k)] = str(v)
    return cls(dataset=meta["dataset"], version=int(meta["version"]), rewrites=rewrites, **cut)

  def to_json(self) -> dict:
    """The whole table as one JSON-compatible dict."""
    return {**self.meta(), **{c: x.tolist() for c, x in self.columns().items()}}

  @classmethod
  def from_json(cls, data: dict) -> PairTable:
    """The table of `to_json`, or of a schema 1 table (string ids, scores by column)."""
    if data.get("schema") == 1:
      data = _migrated_v1(data)
    columns = {c: np.asarray(data.get(c, []), dtype) for c, dtype in COLUMNS.items()}
    columns["scores"] = columns["scores"].reshape(-1, len(SCORE_COLUMNS))
    return cls.from_parts(data, columns)


def _migrated_v1(data: dict) -> dict:
  """A schema 1 table's JSON in schema 2's layout: ids hashed, the score columns stacked."""
  n = len(data["ids"])
  scores = [data["scores"][c] for c in SCORE_COLUMNS]
  if any(len(c) != n for c in (data["dropped"], data["weight"], data["scored_version"],
                               *scores)):
    raise TableSchemaError(f"pair table columns disagree in length with its {n} ids")
  return {"schema": SCHEMA_VERSION, "dataset": data["dataset"], "version": data["version"],
          "rows": n, "rewrites": data["rewrites"],
          "id_hash": [id_hash(i) for i in data["ids"]], "dropped": data["dropped"],
          "weight": data["weight"], "scored_version": data["scored_version"],
          "scores": np.stack([np.asarray(c, np.float32) for c in scores], axis=1).reshape(n, -1)}


@dataclasses.dataclass
class Tables:
  """What a SCIO run saves with each checkpoint step: the active table, the pending one (None
  when no pass result waits) and the stream position from which the pending one applies."""
  active: PairTable
  pending: PairTable | None
  pending_from: int

  def parts(self) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(JSON-compatible meta, {table name: columns}) for `klip.checkpoint`."""
    tables = {"active": self.active, "pending": self.pending}
    meta = {"schema": SCHEMA_VERSION, "pending_from": self.pending_from,
            **{k: None if t is None else t.meta() for k, t in tables.items()}}
    return meta, {k: t.columns() for k, t in tables.items() if t is not None}

  @classmethod
  def from_parts(cls, meta: dict, columns: dict[str, dict[str, np.ndarray]]) -> Tables:
    """The tables of `parts()`, or of a schema 1 checkpoint item (whole tables as JSON)."""
    if "schema" not in meta:  # schema 1: {"active": table JSON, "pending": ..., ...}
      read = {k: None if meta[k] is None else PairTable.from_json(meta[k])
              for k in ("active", "pending")}
    else:
      absent = [k for k in ("active", "pending") if meta[k] is not None and k not in columns]
      if absent:
        raise TableSchemaError(f"the saved SCIO tables lack the columns of {absent}")
      read = {k: None if meta[k] is None else PairTable.from_parts(meta[k], columns[k])
              for k in ("active", "pending")}
    return cls(read["active"], read["pending"], int(meta["pending_from"]))
