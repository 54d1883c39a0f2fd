"""SCIO: the pair table, its join in the pipeline, the rescoring pass and the trainer's use."""

import dataclasses
import json
import zlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import smoke_config
from klip import checkpoint as checkpoint_lib
from klip import inference
from klip import sharding
from klip import train_state
from klip.data import caption as caption_lib
from klip.data import dataset as dataset_lib
from klip.data import pipeline
from klip.data import schema
from klip.data import text as text_lib
from klip.data import tokenizer as tokenizer_lib
from klip.scio import clauses
from klip.scio import rescore
from klip.scio import schedule
from klip.scio import table as table_lib
from klip.data import values as values_lib

SCIO = dict(enabled=True, every_steps=4, slice_size=32, batch_size=16, warmup_fraction=0.2,
            reconstruct_from_fraction=0.5, false_flag_rate=0.02, calibration_min_rows=16,
            margin_cosine=0.0, margin_match=0.0, weight_floor=0.5, max_span=6,
            fill_candidates=0, initial_table="", screen="leave_one_out", screen_candidates=8)


@pytest.fixture(scope="module")
def source(data_dir):
  return dataset_lib.source(data_dir, smoke_config(data_dir).data.dataset, "train")


@pytest.fixture(scope="module")
def tok(source, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  captions = [schema.structured_text(source[i]).caption for i in range(len(source))]
  return tokenizer_lib.train(captions, path, 400)


def _preprocess(tok, config, **kw):
  m = config.model
  return pipeline.Preprocess(tokenizer_path=tok.path, image_size=m.image_size,
                             channels=m.channels, max_len=m.text.max_len,
                             db_min=config.data.db_min, db_max=config.data.db_max,
                             train=False, **kw)


def _table(source, data_dir):
  return table_lib.PairTable.initial(smoke_config(data_dir).data.dataset + ":train",
                                     table_lib.read_id_hashes(source))


def saved_tables(workdir, step=None) -> dict:
  """The SCIO tables of a run's checkpoint step (default the latest) as one JSON-like dict, for
  comparing runs."""
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
  tables = table_lib.Tables.from_parts(*ckpt.restore_table(step or ckpt.latest_step()))
  ckpt.close()
  return {"active": tables.active.to_json(), "pending_from": tables.pending_from,
          "pending": None if tables.pending is None else tables.pending.to_json()}


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


@pytest.mark.parametrize("max_len", [5000, 1000, 90, 40])
def test_leave_one_out_variants_keep_the_full_captions_token_budget(source, tok, max_len):
  st = schema.structured_text(source[3])
  ids, clause, texts = rescore.caption_texts(tok, st, max_len)
  want_ids, want_clause = tok.encode_caption(st, max_len)  # the caption at max_len
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(clause, want_clause)
  np.testing.assert_array_equal(texts[0], ids)
  used = int(np.sum(ids != caption_lib.PAD))
  for k in range(8):
    variant = texts[k + 1]
    if not np.any(clause == k):  # cut off entirely: cannot be judged
      np.testing.assert_array_equal(variant, ids)
      continue
    if max_len >= 1000:  # nothing cut: the caption encoded without clause k
      np.testing.assert_array_equal(variant, tok.encode_caption(st, max_len, skip=k)[0])
    # the full caption's own tokens less clause k's: no clause comes back from truncation
    kept = variant[variant != caption_lib.PAD]
    gone = np.sum(clause == k)
    assert kept.size <= used - gone
    it = iter(ids[:used].tolist())
    assert all(t in it for t in kept.tolist())  # a subsequence of the full caption's tokens
  if max_len == 40:  # the case of interest: clauses cut off
    assert not np.all(np.isin(range(8), clause))
    # encoded afresh without clause k, the caption brings a cut-off clause back
    back = [k for k in range(8) if np.any(clause == k) and
            set(tok.encode_caption(st, max_len, skip=k)[1].tolist()) - set(clause.tolist())]
    assert back


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
  table = _edited(_table(source, data_dir))
  tables = table_lib.Tables(table, _table(source, data_dir), 128)
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
  table = _edited(_table(source, data_dir))
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
  table = _table(source, data_dir)
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
  table = _table(source, data_dir)
  table.rewrites = {4: {0: "ninety nine"}}
  table.dropped[5] = 0
  table.weight[5] = 0.75
  plain = _preprocess(tok, config)
  joined = _preprocess(tok, config, table=table.view())
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


# ----- decisions and bad input -------------------------------------------------------------------
def test_screen_needs_both_scores_and_takes_the_largest_rise():
  cosine = np.array([[0.5, 0.6, 0.7, 0.5], [0.5, 0.6, 0.4, 0.5], [0.5, 0.6, 0.5, 0.5]])
  match = np.array([[0.5, 0.6, 0.7, 0.5], [0.5, 0.5, 0.9, 0.5], [0.5, 0.52, 0.5, 0.5]])
  field = np.tile(rescore.FIELD_OF["target"][:3], (3, 1))
  margins = rescore.Margins.floors((0.05, 0.05))
  rise = rescore.rises(cosine, match)
  np.testing.assert_array_equal(rescore.screen(rise, field, margins), [1, -1, -1])
  field[0, 1] = -1  # a clause that was not judged is never flagged
  np.testing.assert_array_equal(rescore.screen(rise, field, margins), [0, -1, -1])
  np.testing.assert_allclose(rescore.pair_weight(np.array([0.0, 1.0]), 0.5), [0.5, 1.0])
  np.testing.assert_array_equal(rescore.pass_rows(3, 10, 4), [2, 3, 4, 5])
  np.testing.assert_array_equal(rescore.pass_rows(3, 10, 0), np.arange(10))


def _clean_rises(rng, n, sd, rho):
  """[n, 2] normal (cosine, match) rises with spreads `sd` and correlation `rho`, centred
  below zero (removing a true clause costs a little)."""
  z = rng.standard_normal((n, 2))
  z[:, 1] = rho * z[:, 0] + np.sqrt(1 - rho ** 2) * z[:, 1]
  return -0.5 * np.asarray(sd) + z * sd


RATE, TOLERANCE = 0.02, 0.25  # the stated false-flag rate; |measured / RATE - 1| allowed


def test_calibrated_margins_flag_the_stated_rate_of_each_fields_clean_pairs():
  """Clean rises 20 times wider for `environment` than for `count`, 5 % of the rows with one
  planted clause whose removal raises both scores by 6 of its field's spreads: the calibrated
  screen flags about RATE of every field's clean clauses and catches the planted ones; one
  absolute margin for all fields does neither."""
  rng = np.random.default_rng(0)
  n, names = 20000, caption_lib.TARGET_FIELDS
  sd = {f: np.array([0.004, 0.01]) * 20 ** (k / 7) for k, f in enumerate(names)}  # count..env
  rho = {f: 0.5 + 0.4 * (k % 2) for k, f in enumerate(names)}
  rise = np.stack([_clean_rises(rng, n, sd[f], rho[f]) for f in names], axis=1)  # [n, 8, 2]
  field = np.tile(rescore.FIELD_OF["target"], (n, 1))
  planted = np.full(n, -1)
  planted[rng.random(n) < 0.05] = 0
  rows = np.flatnonzero(planted == 0)
  planted[rows] = rng.integers(8, size=len(rows))
  for r in rows:
    rise[r, planted[r]] = 6 * sd[names[planted[r]]]
  margins = rescore.field_margins(rise, field, rate=RATE, floor=(0.0, 0.0), min_rows=16)
  used = [rescore.FIELDS.index(f) for f in names]
  assert margins.calibrated[used].all() and not np.delete(margins.calibrated, used).any()
  clean = planted[:, None] != np.arange(8)  # [n, 8] the clauses nobody planted
  absolute = rescore.Margins.floors((0.01, 0.02))  # one margin pair for every field
  for name, m, want in (("calibrated", margins, True), ("absolute", absolute, False)):
    ok = rescore.passing(rise, field, m)
    rates = [ok[clean[:, k], k].mean() for k in range(8)]
    flag = rescore.screen(rise, field, m)
    recall = [np.mean(flag[planted == k] == k) for k in range(8)]
    print(f"\n{name}: false-flag rate per field {np.round(rates, 4)}, "
          f"recall {np.round(recall, 2)}")
    within = all(abs(x / RATE - 1) <= TOLERANCE for x in rates)
    assert within == want and (min(recall) >= 0.95) == want


def test_fields_with_too_few_rows_use_the_floors_and_the_rate_is_checked():
  rng = np.random.default_rng(1)
  rise = rng.normal(0.0, 0.1, (40, 8, 2))
  field = np.tile(rescore.FIELD_OF["target"], (40, 1))
  field[20:, 0] = -1  # `count` judged on 20 rows only
  margins = rescore.field_margins(rise, field, rate=0.05, floor=(0.01, 0.02), min_rows=30)
  count, location = rescore.FIELDS.index("count"), rescore.FIELDS.index("location")
  np.testing.assert_array_equal(margins.value[count], [0.01, 0.02])
  assert not margins.calibrated[count] and margins.calibrated[location]
  assert np.all(margins.value[location] > 0.02)
  assert not margins.calibrated[rescore.FIELDS.index("terrain")]  # no landform rows at all
  again = rescore.field_margins(rise[::-1], field[::-1], rate=0.05, floor=(0.01, 0.02),
                                min_rows=30)
  np.testing.assert_array_equal(again.value, margins.value)  # the rows' order does not matter
  with pytest.raises(ValueError, match="false_flag_rate=0.0 must be between 0 and 1"):
    rescore.field_margins(rise, field, rate=0.0, floor=(0.0, 0.0), min_rows=1)


def test_bad_captions_are_clear_errors(source, tok):
  st = schema.structured_text(source[0])
  short = text_lib.StructuredText(st.family, st.values[:7], st.caption[:st.spans[6][1]],
                                  st.spans[:7])
  with pytest.raises(ValueError, match="caption has 7 clauses, the .* schema has 8"):
    rescore.caption_texts(tok, short, 160)
  a = st.spans[2][0]
  empty = dataclasses.replace(st, spans=st.spans[:2] + ((a, a),) + st.spans[3:])
  with pytest.raises(ValueError, match="clause 2 .* has an empty value span"):
    rescore.caption_texts(tok, empty, 160)
  ids, clause, texts = rescore.caption_texts(tok, st, 20)  # later clauses are cut off
  cut = [k for k in range(8) if not np.any(clause == k)]
  assert cut and all(np.array_equal(texts[k + 1], ids) for k in cut)
  assert not np.array_equal(texts[1], ids)


def test_stage_schedule_and_epoch_switch(source, tok, data_dir):
  cfg = ml_collections.ConfigDict(SCIO)
  stages = [schedule.stage_at(s, 20, cfg) for s in (0, 3, 4, 9, 10, 20)]
  assert stages == [0, 0, 1, 1, 2, 2]
  config = smoke_config(data_dir, **{f"scio.{k}": v for k, v in SCIO.items()})
  ctl = schedule.Controller(config, source, tok, _preprocess(tok, config), saved=None)
  assert [s for s in range(21) if ctl.due(s)] == [4, 8, 12, 16, 20]
  ctl.pending, ctl.pending_from = _edited(ctl.active), 128
  assert not ctl.switch(120) and ctl.switch(128) and ctl.active.version == 3
  meta, columns = ctl.payload().parts()
  again = schedule.Controller(config, source, tok, _preprocess(tok, config),
                              saved=table_lib.Tables.from_parts(json.loads(json.dumps(meta)),
                                                                columns))
  _assert_same(again.active, ctl.active)
  assert again.pending is None


# ----- the pass on a toy problem with planted wrong clauses --------------------------------------
def _planted(source, n, rate, seed=0):
  """{row: (clause, wrong value)} for about `rate` of the clauses of the first n records."""
  rng = np.random.default_rng(seed)
  values = [schema.structured_text(source[i]) for i in range(len(source))]
  plants = {}
  for i in range(n):
    if rng.random() < rate * 8:
      st = values[i]
      k = int(rng.integers(8))
      others = sorted({v.values[k] for v in values if v.family == st.family} - {st.values[k]})
      if others:
        plants[i] = (k, others[int(rng.integers(len(others)))])
  return values, plants


class OracleScorer:
  """A model stand-in with known preferences: a text scores the fraction of its clauses that
  are true of the image (both scores), and filling restores the true value."""

  def __init__(self, tok, truth_by_image, max_len):
    self.tok, self.truth, self.max_len = tok, truth_by_image, max_len

  def _true(self, image):
    return self.truth[image.tobytes()]

  def score(self, images, texts):
    out = np.zeros(texts.shape[:2], np.float32)
    for r, image in enumerate(images):
      st = self._true(image)
      clauses = [" ".join((caption_lib.PREFIXES[f] + v).split())
                 for f, v in zip(st.field_names, st.values)]
      for v, ids in enumerate(texts[r]):
        text = " ".join(self.tok.decode(ids).split())
        present = sum(text.count(caption_lib.PREFIXES[f].strip()) for f in set(st.field_names))
        out[r, v] = sum(c in text for c in clauses) / max(present, 1)
    return out, out.copy()

  def fill(self, images, ids, clause, k):
    new_ids, new_clause = ids.copy(), clause.copy()
    for r in np.flatnonzero(k >= 0):
      new_ids[r], new_clause[r] = self.tok.encode_caption(self._true(images[r]), self.max_len)
    return new_ids, new_clause

  def rank(self, images, texts):
    return self.score(images, texts)[0]


def keep_fill(images, ids, clause, k):
  """A decoder that writes back the value it was shown (no usable rewrite)."""
  return ids.copy(), clause.copy()


def _planted_oracle(source, tok, data_dir, **scio):
  """(preprocess, true texts, plants, table with the plants, oracle, SCIO config) over the
  first 64 pairs."""
  prep = _preprocess(tok, smoke_config(data_dir))
  values, plants = _planted(source, 64, 0.05)
  table = _table(source, data_dir)
  truth = {}
  for i in range(64):
    truth[prep.random_map((i, source[i]), None)["image"].tobytes()] = values[i]
    if i in plants:
      k, wrong = plants[i]
      table.rewrites[i] = {k: wrong}  # plant the wrong value through the table's rewrites
  oracle = OracleScorer(tok, truth, 1000)  # long enough for every clause
  cfg = ml_collections.ConfigDict(dict(SCIO, slice_size=64, margin_cosine=0.02,
                                       margin_match=0.02, **scio))
  return prep, values, plants, table, oracle, cfg


def test_screening_finds_planted_wrong_clauses_and_reconstruct_repairs_them(
    source, tok, data_dir):
  prep, values, plants, table, oracle, cfg = _planted_oracle(source, tok, data_dir)
  proof, result = rescore.run_pass(table, source, prep, tok, oracle.score, oracle.fill,
                                   stage=rescore.Stage.PROOFREAD, cfg=cfg, max_len=1000)
  found = {int(i): int(k) for i, k in zip(result.rows, result.flagged) if k >= 0}
  truth_flags = {i: k for i, (k, _) in plants.items()}
  hits = sum(found.get(i) == k for i, k in truth_flags.items())
  precision, recall = hits / max(len(found), 1), hits / max(len(truth_flags), 1)
  print(f"\nplanted {len(plants)} wrong clauses in 64 pairs: precision {precision:.2f}, "
        f"recall {recall:.2f}")
  assert len(plants) >= 8 and precision == 1.0 and recall == 1.0
  assert proof.version == 1 and all(proof.dropped[i] == k for i, k in truth_flags.items())
  assert np.all(proof.scored_version[:64] == 1) and np.all(proof.scored_version[64:] == -1)
  assert np.all(proof.weight[:64] == 1.0)  # the oracle fully agrees with every kept caption
  assert result.metrics()["scio/flag_rate"] == len(plants) / 64
  fixed, result = rescore.run_pass(table, source, prep, tok, oracle.score, oracle.fill,
                                   stage=rescore.Stage.RECONSTRUCT, cfg=cfg, max_len=1000)
  assert result.rewritten.sum() == len(plants)
  for i, (k, _) in plants.items():
    assert fixed.rewrites[i] == {k: values[i].values[k]} and fixed.dropped[i] == -1


class SpreadScorer:
  """Clean pairs whose rises spread by field: the full caption scores 0.5 on both scores, and
  leaving out clause k adds normal noise of the spread of its field (fixed by the image)."""

  def __init__(self, fields_by_image, spread):
    self.fields, self.spread = fields_by_image, spread

  def rises(self, image):
    rng = np.random.default_rng(zlib.crc32(image.tobytes()))
    return rng.standard_normal((caption_lib.CLAUSES, 2)) * self.spread[self.fields[
        image.tobytes()]][:, None]

  def score(self, images, texts):
    cosine = np.full(texts.shape[:2], 0.5, np.float32)
    match = cosine.copy()
    for r, image in enumerate(images):
      rise = self.rises(image)
      cosine[r, 1:] += rise[:, 0]
      match[r, 1:] += rise[:, 1]
    return cosine, match


@pytest.mark.parametrize("min_rows", [16, 1000])
def test_the_pass_calibrates_on_its_rows_and_reports_the_margins(source, tok, data_dir,
                                                                 min_rows):
  prep = _preprocess(tok, smoke_config(data_dir))
  images, fields = [], []
  for i in range(64):
    images.append(prep.random_map((i, source[i]), None)["image"])
    fields.append(rescore.FIELD_OF[schema.structured_text(source[i]).family])
  spread = np.geomspace(0.002, 0.2, len(rescore.FIELDS))  # field f: 100 ** (f / 14) times 0.002
  scorer = SpreadScorer({im.tobytes(): f for im, f in zip(images, fields)}, spread)
  cfg = ml_collections.ConfigDict(dict(SCIO, slice_size=64, margin_cosine=0.01,
                                       margin_match=0.02, calibration_min_rows=min_rows))
  _, result = rescore.run_pass(_table(source, data_dir), source, prep, tok, scorer.score, None,
                               stage=rescore.Stage.PROOFREAD, cfg=cfg, max_len=1000)
  rise = rescore.rises(*scorer.score(np.stack(images), np.zeros((64, 9, 1), np.int32)))
  field = np.stack(fields)
  want = rescore.field_margins(rise, field, rate=cfg.false_flag_rate, floor=(0.01, 0.02),
                               min_rows=min_rows)
  np.testing.assert_array_equal(result.rows, np.arange(64))
  np.testing.assert_array_equal(result.margins.value, want.value)
  np.testing.assert_array_equal(result.flagged, rescore.screen(rise, field, want))
  metrics = result.metrics()
  count = rescore.FIELDS.index("count")
  assert metrics["scio/margin_cosine/count"] == result.margins.value[count, 0]
  assert metrics["scio/margin_match/water"] == result.margins.value[-1, 1]
  calibrated = metrics["scio/calibrated_fields"]
  if min_rows == 1000:  # every field on the floors: the absolute screen
    assert calibrated == 0 and np.all(result.margins.value == [0.01, 0.02])
  else:  # both families have enough rows; the wide fields' margins grow with their spread
    assert calibrated == len(rescore.FIELDS)
    assert result.margins.value[-1, 1] > 0.1 > 0.02 == result.margins.value[count, 1]


def test_a_malformed_caption_is_skipped_and_counted_not_the_end_of_the_pass(
    source, tok, data_dir):
  prep, values, plants, table, oracle, cfg = _planted_oracle(source, tok, data_dir)
  bad = next(i for i in range(64) if i not in plants)
  table.rewrites[bad] = {2: " "}  # an empty value span: the caption cannot be judged
  new, result = rescore.run_pass(table, source, prep, tok, oracle.score, oracle.fill,
                                 stage=rescore.Stage.PROOFREAD, cfg=cfg, max_len=1000)
  assert result.malformed == 1 and result.unreadable == 0
  assert result.metrics()["scio/skipped_malformed"] == 1.0
  assert bad not in result.rows and len(result.rows) == 63
  assert new.scored_version[bad] == -1 and new.dropped[bad] == -1
  found = {int(i): int(k) for i, k in zip(result.rows, result.flagged) if k >= 0}
  assert found == {i: k for i, (k, _) in plants.items()}  # the other pairs as before


def test_value_pool_ranks_by_frequency_without_the_own_value():
  sts = [text_lib.compose("target", ("2", "ships", "small", "the centre", "clustered", "sea",
                                     v, "land")) for v in ("b", "a", "a", "c", "b", "a")]
  pool = values_lib.ValuePool.from_texts(sts)
  assert pool.others(sts[0], 6, 5) == ["a", "c"]  # a (3 times) first; its own value b left out
  assert pool.others(sts[1], 6, 1) == ["b"]
  assert pool.others(sts[1], 6, 5, exclude=("b",)) == ["c"]
  assert pool.others(sts[0], 0, 5) == []  # every text has count "2"


@pytest.mark.parametrize("n_values", [0, 64])
def test_reconstruct_candidates_from_the_value_pool(source, tok, data_dir, n_values):
  """A decoder that cannot write a new value repairs nothing alone; given the field's other
  values to rank (by a ranking that knows the truth), it restores every planted clause."""
  prep, values, plants, table, oracle, cfg = _planted_oracle(source, tok, data_dir,
                                                             fill_candidates=n_values)
  fixed, result = rescore.run_pass(table, source, prep, tok, oracle.score, keep_fill,
                                   stage=rescore.Stage.RECONSTRUCT, cfg=cfg, max_len=1000,
                                   rank=oracle.rank,
                                   pool=values_lib.ValuePool.from_source(source))
  assert len(plants) >= 8 and np.sum(result.flagged >= 0) == len(plants)
  if not n_values:
    assert result.rewritten.sum() == 0 and fixed.rewrites == table.rewrites
    return
  assert result.rewritten.sum() == len(plants)
  for i, (k, _) in plants.items():
    assert fixed.rewrites[i] == {k: values[i].values[k]} and fixed.dropped[i] == -1


# ----- the clause screen -------------------------------------------------------------------------
def test_clause_rises_map_the_judged_slots_to_their_clauses_and_fields():
  rivals = 3
  cos = np.zeros((2, clauses.SLOTS, 1 + rivals), np.float32)
  cos[:, :, 0] = 0.5                 # every own clause scores 0.5 by cosine
  cos[0, 1, 2] = 0.9                 # row 0: slot 1's second rival scores higher
  cos[1, 4, 1], cos[1, 4, 3] = 0.6, 0.7
  match = cos * 0.5
  rise, rival, field = clauses.rises(cos.reshape(2, -1), match.reshape(2, -1),
                                     ["target", "landform"])
  target, landform = clauses.JUDGED["target"], clauses.JUDGED["landform"]
  assert rise.shape == (2, caption_lib.CLAUSES, 2)
  np.testing.assert_allclose(rise[0, target[1]], [0.4, 0.2], atol=1e-6)
  np.testing.assert_allclose(rise[1, landform[4]], [0.2, 0.1], atol=1e-6)
  assert rival[0, target[1]] == 2 and rival[1, landform[4]] == 3
  # only the observable clauses are judged, each with its field's index
  for r, family in enumerate(["target", "landform"]):
    judged = field[r] >= 0
    assert [caption_lib.FAMILIES[family][k] for k in np.flatnonzero(judged)] == [
        f for f in caption_lib.FAMILIES[family] if f in caption_lib.OBSERVABLE_FIELDS]
    assert [rescore.FIELDS[f] for f in field[r][judged]] == [
        caption_lib.FAMILIES[family][k] for k in np.flatnonzero(judged)]
  # a process whose share of a chunk is empty
  empty = clauses.rises(np.zeros((0, cos[0].size)), np.zeros((0, cos[0].size)), [])
  assert [x.shape for x in empty] == [(0, caption_lib.CLAUSES, 2), (0, caption_lib.CLAUSES),
                                      (0, caption_lib.CLAUSES)]
  with pytest.raises(ValueError, match="scio.screen='leave-one-out'"):
    clauses.check("leave-one-out")


@pytest.mark.parametrize("overrides,message", [
    ({"loss.clause_contrast_weight": 0.0}, "clause_contrast_weight=0.0"),
    ({"scio.screen_candidates": 0}, "screen_candidates=0"),
])
def test_the_clause_screen_refuses_a_config_it_cannot_work_with(data_dir, overrides, message):
  config = smoke_config(data_dir, **{"scio.enabled": True, **overrides})
  with pytest.raises(ValueError, match=message):
    clauses.check_config(config)
  config.scio.screen = "leave_one_out"  # the method's screen needs neither
  clauses.check_config(config)


def test_clause_options_pair_each_observable_clause_with_its_fields_frequent_values(tok):
  sts = [text_lib.compose("target", (n, "at the centre", "bright", "30 m", c, "single", "sea",
                                     "land")) for n, c in (("2", "ship"), ("2", "ship"),
                                                           ("1", "tank"), ("3", "ship"))]
  pool = values_lib.ValuePool.from_texts(sts)
  tokens, values = clauses.options(tok, sts[2], pool, 2, 24)
  assert tokens.shape == (clauses.SLOTS * 3, 24)
  count = clauses.JUDGED["target"].index(0)
  assert values[count] == ["1", "2", "3"]  # its own value, then the others by frequency
  category = clauses.JUDGED["target"].index(4)
  assert values[category] == ["tank", "ship", "tank"]  # one rival: the own value repeated
  assert tok.decode(tokens[3 * category + 1]).strip() == (
      caption_lib.PREFIXES["category"] + "ship").strip()


def test_clause_screen_flags_planted_clauses_and_rewrites_them_to_their_best_rival(
    source, tok, data_dir):
  """With an oracle that scores a text by the share of its clauses true of the image, the
  clause screen flags exactly the planted clauses whose true value is among the rivals it
  tries, and the reconstruct stage writes that value back."""
  prep = _preprocess(tok, smoke_config(data_dir))
  values = [schema.structured_text(source[i]) for i in range(len(source))]
  pool = values_lib.ValuePool.from_texts(values)
  table, truth, plants = _table(source, data_dir), {}, {}
  rng = np.random.default_rng(0)
  for i in range(64):
    st = values[i]
    truth[prep.random_map((i, source[i]), None)["image"].tobytes()] = st
    k = int(rng.choice(clauses.JUDGED[st.family]))
    wrong = pool.others(st, k, 1)  # the field's most frequent other value
    if rng.random() < 0.5 and wrong:
      plants[i] = k
      table.rewrites[i] = {k: wrong[0]}
  findable = {i: k for i, k in plants.items() if values[i].values[k] in pool.others(
      table_lib.rewritten(values[i], table.rewrites[i]), k, 8)}
  oracle = OracleScorer(tok, truth, 1000)
  cfg = ml_collections.ConfigDict(dict(SCIO, slice_size=64, margin_cosine=0.02,
                                       margin_match=0.02, screen="clause"))
  run = lambda stage: rescore.run_pass(table, source, prep, tok, oracle.score, None,  # noqa: E731
                                       stage=stage, cfg=cfg, max_len=1000, pool=pool,
                                       clause_len=64)
  proof, result = run(rescore.Stage.PROOFREAD)
  found = {int(i): int(k) for i, k in zip(result.rows, result.flagged) if k >= 0}
  assert len(findable) >= 8 and found == findable
  assert all(proof.dropped[i] == k for i, k in findable.items()) and not proof.rewrites.keys() - (
      table.rewrites.keys())
  fixed, result = run(rescore.Stage.RECONSTRUCT)
  assert result.rewritten.sum() == len(findable)
  for i, k in findable.items():
    assert fixed.rewrites[i] == {k: values[i].values[k]} and fixed.dropped[i] == -1
    assert fixed.weight[i] == 1.0  # the oracle fully agrees with the rewritten caption
  with pytest.raises(ValueError, match="clause_max_len"):
    rescore.run_pass(table, source, prep, tok, oracle.score, None, cfg=cfg, max_len=1000,
                     stage=rescore.Stage.PROOFREAD, pool=pool)


# ----- the real model: sharded pass equals unsharded ---------------------------------------------
def _scorer_on_mesh(config, tok, dims, devices):
  """(ModelScorer, train state) of a fresh model on a mesh (no mesh context needed)."""
  mesh = sharding.make_mesh(dict(slice=1, **dims), devices)
  rules = config.sharding_rules
  graphdef, state, shardings = train_state.create(config, mesh, rules)
  harness = inference.Inference(graphdef, shardings, mesh, rules, model_of=lambda m: m.model,
                                compiler_options=inference.scoring_options(mesh))
  return rescore.ModelScorer(harness, state, max_span=4), state


def _pass_on_mesh(config, source, tok, dims, devices):
  scorer, _ = _scorer_on_mesh(config, tok, dims, devices)
  images = np.random.default_rng(0).normal(size=(16, 32, 32, 2)).astype(np.float32)
  _, _, texts = rescore.caption_texts(tok, schema.structured_text(source[0]), 64)
  cosine, match = scorer.score(images, np.repeat(texts[None], 16, axis=0))
  table, result = rescore.run_pass(
      table_lib.PairTable.initial("d", table_lib.read_id_hashes(source)), source,
      _preprocess(tok, config), tok, scorer.score, None,
      stage=rescore.Stage.PROOFREAD, cfg=config.scio, max_len=64,
      pool=values_lib.ValuePool.from_source(source), clause_len=config.loss.clause_max_len)
  return cosine, match, table, result


def test_scorer_compiles_without_ynnpack_fusions_on_cpu(tok, data_dir):
  """The pass's jits take `scoring_options` (bench/README.md: a scoring chunk 1.34 s instead of
  1.64 s); the same function jitted plainly gets YNNPACK fusions."""
  images = np.zeros((4, 32, 32, 2), np.float32)
  texts = np.ones((4, 9, 64), np.int32)
  scorer, state = _scorer_on_mesh(smoke_config(data_dir), tok, dict(data=1, fsdp=1, tensor=1),
                                  jax.devices()[:1])
  ynn = lambda f: f.lower(state, images, texts).compile().as_text().count("__ynn_fusion")
  scores = scorer.inference.jitted(inference.variant_scores, 4, 3)
  assert ynn(jax.jit(scores.__wrapped__)) > 0
  assert ynn(scores) == 0
  assert ynn(scorer.inference.jitted(inference.variant_logprobs, 4, 3)) == 0


@pytest.mark.parametrize("screen", clauses.SCREENS)
def test_rescoring_pass_sharded_equals_unsharded(source, tok, data_dir, screen):
  config = smoke_config(data_dir, **{f"scio.{k}": v for k, v in dict(SCIO, screen=screen).items()})
  one = _pass_on_mesh(config, source, tok, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  eight = _pass_on_mesh(config, source, tok, dict(data=2, fsdp=2, tensor=2), jax.devices())
  for a, b in zip(one[:2], eight[:2]):
    assert a.shape == (16, 9)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(one[2].scores, eight[2].scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(one[3].rows, np.arange(32))
  assert np.all(one[2].scored_version[:32] == 1)
