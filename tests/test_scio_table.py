"""SCIO's pair table: the tokenizer's leave-one-clause-out encoding, the table's checkpoint
round trip and schema checks, per-process reads, its join in the pipeline and the controller's
stage schedule."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

import scio_support as support
from conftest import smoke_config
from klip import checkpoint as checkpoint_lib
from klip import inference
from klip.data import caption as caption_lib
from klip.data import schema
from klip.data import values as values_lib
from klip.scio import schedule
from klip.scio import table as table_lib


# ----- tokenizer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(8))
def test_encode_caption_skip_leaves_out_exactly_one_clause(source, tok, k):
  st = schema.structured_text(source[3])
  ids, clause = tok.encode_caption(st, 1000)  # long enough for every clause
  ids_k, clause_k = tok.encode_caption(st, 1000, skip=k)
  clauses = st.caption.split(caption_lib.SEPARATOR)
  expected = caption_lib.SEPARATOR.join(c for j, c in enumerate(clauses) if j != k)
  assert tok.decode(ids_k).split() == tok.decode(
      tok.encode_pieces(expected.replace(caption_lib.SEPARATOR, " "))).split()
  assert set(clause_k[clause_k >= 0].tolist()) == set(range(8)) - {k}
  for j in set(range(8)) - {k}:  # every other value span is tokenized exactly as before
    np.testing.assert_array_equal(ids_k[clause_k == j], ids[clause == j])
  assert np.sum(ids_k == caption_lib.SEP) == 6 and ids_k[0] == caption_lib.ENC
  with pytest.raises(ValueError, match="cannot leave out clause 8"):
    tok.encode_caption(st, 160, skip=8)


# ----- table -------------------------------------------------------------------------------------
def _edited(table):
  t = table.copy()
  t.version = 3
  t.dropped[[1, 5]] = [2, 7]
  t.weight[1] = 0.625
  t.scores[1] = (0.1, 0.2, 0.3, 0.4)
  t.scored_version[1] = 3
  t.rewrites = {4: {0: "five", 6: "a busy harbour"}}
  return t


def _assert_same(a, b):
  assert (a.dataset, a.version, a.rewrites) == (b.dataset, b.version, b.rewrites)
  for f in table_lib.COLUMNS:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert getattr(a, f).dtype == getattr(b, f).dtype


def test_table_round_trips_through_a_checkpoint(source, data_dir, tmp_path):
  """The columns are saved as arrays split by rows over the 8 devices (the JSON part holds no
  per-row list) and come back as host arrays of the table's rows; a step without tables reads
  as None."""
  table = _edited(support.initial_table(source, data_dir))
  tables = table_lib.Tables(table, support.initial_table(source, data_dir), 128)
  state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=True)
  ckpt.save(1, state, {"step": 1})
  ckpt.save(2, state, {"step": 2}, tables=tables)
  ckpt.wait()
  assert ckpt.restore_table(1) is None
  meta, columns = ckpt.restore_table(2)
  ckpt.close()
  assert not any(isinstance(v, list) and len(v) == len(table)
                 for t in ("active", "pending") for v in meta[t].values())
  saved = checkpoint_lib.ocp.PyTreeCheckpointHandler().metadata(
      tmp_path / "checkpoints" / "2" / "scio_rows").tree
  assert saved["active"]["weight"].shape == (-(-len(table) // 8) * 8,)  # padded to 8 shards
  assert isinstance(columns["active"]["weight"], np.ndarray)
  back = table_lib.Tables.from_parts(meta, columns)
  assert back.pending_from == 128
  _assert_same(back.active, table)
  _assert_same(back.pending, tables.pending)
  back.active.check(table.dataset, source)


def test_schema_1_tables_migrate(source, data_dir, tmp_path):
  """A checkpoint step written with the tables as one JSON item (schema 1: string ids, score
  columns by name) reads as today's tables, ids hashed."""
  table = _edited(support.initial_table(source, data_dir))
  ids = [schema.example_id(source[i]) for i in range(len(source))]
  v1 = {"schema": 1, "dataset": table.dataset, "version": table.version, "ids": ids,
        "dropped": table.dropped.tolist(), "weight": table.weight.tolist(),
        "scores": {c: table.scores[:, j].tolist()
                   for j, c in enumerate(table_lib.SCORE_COLUMNS)},
        "scored_version": table.scored_version.tolist(),
        "rewrites": [[4, 0, "five"], [4, 6, "a busy harbour"]]}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt._manager.save(3, args=checkpoint_lib.ocp.args.Composite(  # pylint: disable=protected-access
      state=checkpoint_lib.ocp.args.StandardSave({"w": np.zeros(2)}),
      data=checkpoint_lib.ocp.args.JsonSave({"step": 3}),
      scio=checkpoint_lib.ocp.args.JsonSave({"active": v1, "pending": None,
                                             "pending_from": 64})))
  ckpt.wait()
  back = table_lib.Tables.from_parts(*ckpt.restore_table(3))
  ckpt.close()
  _assert_same(back.active, table)
  assert back.pending is None and back.pending_from == 64
  with pytest.raises(table_lib.TableSchemaError, match="disagree in length"):
    table_lib.PairTable.from_json(dict(v1, weight=v1["weight"][1:]))


def test_table_from_another_dataset_or_schema_is_refused(source, data_dir):
  table = support.initial_table(source, data_dir)
  with pytest.raises(table_lib.TableMismatchError, match="not 'other:train'"):
    table.check("other:train", source)
  shifted = dataclasses.replace(table, id_hash=np.roll(table.id_hash, -1))
  with pytest.raises(table_lib.TableMismatchError, match="row 0 holds another example"):
    shifted.check(table.dataset, source)
  view = shifted.view()
  with pytest.raises(table_lib.TableMismatchError, match="record 0 has id"):
    view.apply(0, schema.example_id(source[0]), schema.structured_text(source[0]))
  old = dict(table.to_json(), schema=0)
  with pytest.raises(table_lib.TableSchemaError, match="schema version 0.*reads version 2"):
    table_lib.PairTable.from_json(old)
  _assert_same(table_lib.PairTable.from_json(json.loads(json.dumps(table.to_json()))), table)
  with pytest.raises(table_lib.TableSchemaError, match="column 'weight' has shape"):
    table_lib.PairTable.from_parts(table.meta(), dict(table.columns(), weight=table.weight[1:]))


def test_processes_split_the_reads_and_merge_them(source, data_dir, monkeypatch):
  """Each of P processes reads only its share of the records (ids for the table, captions for
  the value pool); the exchange rebuilds what one process reading everything gets."""
  n = len(source)
  for count in (1, 2, 3):
    procs = [inference.Processes() for _ in range(count)]
    for k, p in enumerate(procs):
      p.index, p.count = k, count
    shares = [p.share(n) for p in procs]
    assert [i for r in shares for i in r] == list(range(n))
    reads = [table_lib.read_id_hashes(source, r) for r in shares]
    pools = [values_lib.ValuePool.from_source(source, r) for r in shares]
    for p in procs:  # what gather returns on every process: each one's padded share
      monkeypatch.setattr(p, "gather", lambda x, mine=p: np.stack(
          [np.pad(reads[q.index], (0, len(x) - len(reads[q.index]))) for q in procs]))
      monkeypatch.setattr(p, "gather_json", lambda v: [q.to_rows() for q in pools])
      np.testing.assert_array_equal(schedule.read_id_hashes(source, p),
                                    table_lib.read_id_hashes(source))
      assert schedule.value_pool(source, p) == values_lib.ValuePool.from_source(source)


# ----- pipeline join -----------------------------------------------------------------------------
def test_pipeline_joins_rewrites_dropped_clauses_and_weights(source, tok, data_dir):
  config = smoke_config(data_dir)
  table = support.initial_table(source, data_dir)
  table.rewrites = {4: {0: "ninety nine"}}
  table.dropped[5] = 0
  table.weight[5] = 0.75
  plain = support.preprocess(tok, config)
  joined = support.preprocess(tok, config, table=table.view())
  rng = np.random.default_rng(0)
  ex4 = joined.random_map((4, source[4]), rng)
  assert "ninety nine" in tok.decode(ex4["tokens"][ex4["clause"] == 0])
  ex5, base5 = joined.random_map((5, source[5]), rng), plain.random_map((5, source[5]), rng)
  assert 0 not in ex5["clause"] and 0 in base5["clause"] and 1 in ex5["clause"]
  assert ex5["weight"] == np.float32(0.75) and base5["weight"] == 1.0
  np.testing.assert_array_equal(ex5["image"], base5["image"])
  ex6 = joined.random_map((6, source[6]), rng)
  np.testing.assert_array_equal(ex6["tokens"], plain.random_map((6, source[6]), rng)["tokens"])
  with pytest.raises(table_lib.TableMismatchError, match="record 7 has id"):
    joined.random_map((7, source[8]), rng)  # a record the table does not expect at row 7


# ----- the controller --------------------------------------------------------------------------
def test_stage_schedule_and_epoch_switch(source, tok, data_dir):
  cfg = ml_collections.ConfigDict(support.SCIO)
  stages = [schedule.stage_at(s, 20, cfg) for s in (0, 3, 4, 9, 10, 20)]
  assert stages == [0, 0, 1, 1, 2, 2]
  config = smoke_config(data_dir, **{f"scio.{k}": v for k, v in support.SCIO.items()})
  ctl = schedule.Controller(config, source, tok, support.preprocess(tok, config), saved=None)
  assert [s for s in range(21) if ctl.due(s)] == [4, 8, 12, 16, 20]
  ctl.pending, ctl.pending_from = _edited(ctl.active), 128
  assert not ctl.switch(120) and ctl.switch(128) and ctl.active.version == 3
  meta, columns = ctl.payload().parts()
  again = schedule.Controller(config, source, tok, support.preprocess(tok, config),
                              saved=table_lib.Tables.from_parts(json.loads(json.dumps(meta)),
                                                                columns))
  _assert_same(again.active, ctl.active)
  assert again.pending is None
