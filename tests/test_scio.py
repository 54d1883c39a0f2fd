"""SCIO's rescoring pass: the leave-one-out texts, the screen and its calibration, bad input,
the pass on toy problems with planted wrong clauses (both screens) and on the real model,
sharded and not (the table and its join: tests/test_scio_table.py)."""

import dataclasses
import zlib

import jax
import ml_collections
import numpy as np
import pytest

import scio_support as support
from conftest import smoke_config
from klip import inference
from klip import sharding
from klip import train_state
from klip.data import caption as caption_lib
from klip.data import content as content_lib
from klip.data import schema
from klip.data import text as text_lib
from klip.data import values as values_lib
from klip.scio import clauses
from klip.scio import margins as margins_lib
from klip.scio import rescore
from klip.scio import table as table_lib

SCIO = support.SCIO


# ----- the leave-one-out texts ------------------------------------------------------------------
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


# ----- decisions and bad input -------------------------------------------------------------------
def test_screen_needs_both_scores_and_takes_the_largest_rise():
  cosine = np.array([[0.5, 0.6, 0.7, 0.5], [0.5, 0.6, 0.4, 0.5], [0.5, 0.6, 0.5, 0.5]])
  match = np.array([[0.5, 0.6, 0.7, 0.5], [0.5, 0.5, 0.9, 0.5], [0.5, 0.52, 0.5, 0.5]])
  field = np.tile(margins_lib.FIELD_OF["target"][:3], (3, 1))
  margins = margins_lib.Margins.floors((0.05, 0.05))
  rise = margins_lib.rises(cosine, match)
  np.testing.assert_array_equal(margins_lib.screen(rise, field, margins), [1, -1, -1])
  field[0, 1] = -1  # a clause that was not judged is never flagged
  np.testing.assert_array_equal(margins_lib.screen(rise, field, margins), [0, -1, -1])
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
  field = np.tile(margins_lib.FIELD_OF["target"], (n, 1))
  planted = np.full(n, -1)
  planted[rng.random(n) < 0.05] = 0
  rows = np.flatnonzero(planted == 0)
  planted[rows] = rng.integers(8, size=len(rows))
  for r in rows:
    rise[r, planted[r]] = 6 * sd[names[planted[r]]]
  margins = margins_lib.field_margins(rise, field, rate=RATE, floor=(0.0, 0.0), min_rows=16)
  used = [margins_lib.FIELDS.index(f) for f in names]
  assert margins.calibrated[used].all() and not np.delete(margins.calibrated, used).any()
  clean = planted[:, None] != np.arange(8)  # [n, 8] the clauses nobody planted
  absolute = margins_lib.Margins.floors((0.01, 0.02))  # one margin pair for every field
  for name, m, want in (("calibrated", margins, True), ("absolute", absolute, False)):
    ok = margins_lib.passing(rise, field, m)
    rates = [ok[clean[:, k], k].mean() for k in range(8)]
    flag = margins_lib.screen(rise, field, m)
    recall = [np.mean(flag[planted == k] == k) for k in range(8)]
    print(f"\n{name}: false-flag rate per field {np.round(rates, 4)}, "
          f"recall {np.round(recall, 2)}")
    within = all(abs(x / RATE - 1) <= TOLERANCE for x in rates)
    assert within == want and (min(recall) >= 0.95) == want


def test_fields_with_too_few_rows_use_the_floors_and_the_rate_is_checked():
  rng = np.random.default_rng(1)
  rise = rng.normal(0.0, 0.1, (40, 8, 2))
  field = np.tile(margins_lib.FIELD_OF["target"], (40, 1))
  field[20:, 0] = -1  # `count` judged on 20 rows only
  margins = margins_lib.field_margins(rise, field, rate=0.05, floor=(0.01, 0.02), min_rows=30)
  count, location = margins_lib.FIELDS.index("count"), margins_lib.FIELDS.index("location")
  np.testing.assert_array_equal(margins.value[count], [0.01, 0.02])
  assert not margins.calibrated[count] and margins.calibrated[location]
  assert np.all(margins.value[location] > 0.02)
  assert not margins.calibrated[margins_lib.FIELDS.index("terrain")]  # no landform rows at all
  again = margins_lib.field_margins(rise[::-1], field[::-1], rate=0.05, floor=(0.01, 0.02),
                                min_rows=30)
  np.testing.assert_array_equal(again.value, margins.value)  # the rows' order does not matter
  with pytest.raises(ValueError, match="false_flag_rate=0.0 must be between 0 and 1"):
    margins_lib.field_margins(rise, field, rate=0.0, floor=(0.0, 0.0), min_rows=1)


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


# ----- the pass on a toy problem with planted wrong clauses --------------------------------------
def _planted(source, n, rate, seed=0):
  """{row: (clause, wrong value)} for about `rate` of the clauses of the first n records; a
  wrong value says something else than the true one (a rewording is not wrong, `content`)."""
  rng = np.random.default_rng(seed)
  values = [schema.structured_text(source[i]) for i in range(len(source))]
  plants = {}
  for i in range(n):
    if rng.random() < rate * 8:
      st = values[i]
      k = int(rng.integers(8))
      said = content_lib.content(st.field_names[k], st.values[k])
      others = sorted({v.values[k] for v in values if v.family == st.family
                       and content_lib.content(st.field_names[k], v.values[k]) != said})
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
  prep = support.preprocess(tok, smoke_config(data_dir))
  values, plants = _planted(source, 64, 0.05)
  table = support.initial_table(source, data_dir)
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
  prep = support.preprocess(tok, smoke_config(data_dir))
  images, fields = [], []
  for i in range(64):
    images.append(prep.random_map((i, source[i]), None)["image"])
    fields.append(margins_lib.FIELD_OF[schema.structured_text(source[i]).family])
  spread = np.geomspace(0.002, 0.2, len(margins_lib.FIELDS))  # field f: 100 ** (f / 14) times 0.002
  scorer = SpreadScorer({im.tobytes(): f for im, f in zip(images, fields)}, spread)
  cfg = ml_collections.ConfigDict(dict(SCIO, slice_size=64, margin_cosine=0.01,
                                       margin_match=0.02, calibration_min_rows=min_rows))
  table = support.initial_table(source, data_dir)
  _, result = rescore.run_pass(table, source, prep, tok, scorer.score, None,
                               stage=rescore.Stage.PROOFREAD, cfg=cfg, max_len=1000)
  rise = margins_lib.rises(*scorer.score(np.stack(images), np.zeros((64, 9, 1), np.int32)))
  field = np.stack(fields)
  want = margins_lib.field_margins(rise, field, rate=cfg.false_flag_rate, floor=(0.01, 0.02),
                               min_rows=min_rows)
  np.testing.assert_array_equal(result.rows, np.arange(64))
  np.testing.assert_array_equal(result.margins.value, want.value)
  np.testing.assert_array_equal(result.flagged, margins_lib.screen(rise, field, want))
  metrics = result.metrics()
  count = margins_lib.FIELDS.index("count")
  assert metrics["scio/margin_cosine/count"] == result.margins.value[count, 0]
  assert metrics["scio/margin_match/water"] == result.margins.value[-1, 1]
  calibrated = metrics["scio/calibrated_fields"]
  if min_rows == 1000:  # every field on the floors: the absolute screen
    assert calibrated == 0 and np.all(result.margins.value == [0.01, 0.02])
  else:  # both families have enough rows; the wide fields' margins grow with their spread
    assert calibrated == len(margins_lib.FIELDS)
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


def test_a_fill_that_rewords_the_flagged_value_is_not_a_rewrite(tok):
  """The decoder's fill is kept only if it says something else than the flagged value
  (`content`): "three ships" for "3" would change the caption and repair nothing."""
  st = text_lib.compose("target", ("3", "the centre of the image", "bright", "small", "ship",
                                   "single", "sea", "open water"))
  for fill, kept in (("three ships", False), ("3", False), ("4 ships", True)):
    ids, clause = tok.encode_caption(table_lib.rewritten(st, {0: fill}), 64)
    got = rescore._candidate(tok, st, ids, clause, 0)  # pylint: disable=protected-access
    assert (got is not None) == kept, fill
    if kept:
      assert got.values[0] == fill and got.values[1:] == st.values[1:]


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
    assert [margins_lib.FIELDS[f] for f in field[r][judged]] == [
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
  prep = support.preprocess(tok, smoke_config(data_dir))
  values = [schema.structured_text(source[i]) for i in range(len(source))]
  pool = values_lib.ValuePool.from_texts(values)
  table, truth, plants = support.initial_table(source, data_dir), {}, {}
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
      support.preprocess(tok, config), tok, scorer.score, None,
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
