"""Negatives from other values of a field: the value pool, clause swaps and clause rivals, and
the pipeline's examples that carry them."""

import numpy as np
import pytest

from klip.data import caption as caption_lib
from klip.data import content as content_lib
from klip.data import dataset as dataset_lib
from klip.data import negatives
from klip.data import pipeline
from klip.data import schema
from klip.data import text as text_lib
from klip.data import tokenizer as tokenizer_lib
from klip.data import values as values_lib

NAME = "synthetic/n160_s32_c2_seed0"


@pytest.fixture(scope="module")
def source(data_dir):
  return dataset_lib.source(data_dir, NAME, "train")


@pytest.fixture(scope="module")
def pool(source):
  return values_lib.ValuePool.sample(source)


def test_pool_holds_the_fields_seen_in_the_records(source, pool):
  assert pool.counts and any(f in caption_lib.OBSERVABLE_FIELDS for _, f in pool.counts)
  st = schema.structured_text(source[0])
  for name, value in zip(st.field_names, st.values):
    assert value in pool.distinct(st.family, name)


def test_swap_changes_exactly_one_observable_clause_never_the_skipped_one(source, pool):
  rng = np.random.default_rng(0)
  swapped_fields = set()
  for i in range(len(source)):
    st = schema.structured_text(source[i])
    skip = i % len(st.values)
    out = negatives.swap(pool, st, rng, skip=skip)
    assert out is not None
    changed = [k for k in range(len(st.values)) if out.values[k] != st.values[k]]
    assert len(changed) == 1 and changed[0] != skip
    name = st.field_names[changed[0]]
    assert name in caption_lib.OBSERVABLE_FIELDS
    assert out.values[changed[0]] in pool.distinct(st.family, name)
    assert content_lib.content(name, out.values[changed[0]]) != \
        content_lib.content(name, st.values[changed[0]])  # not a rewording
    swapped_fields.add(name)
  assert len(swapped_fields) >= 4  # the choice is spread over the fields


def test_swap_gives_none_when_no_field_has_another_value(source):
  st = schema.structured_text(source[0])
  single = values_lib.ValuePool.from_texts([st])
  assert negatives.swap(single, st, np.random.default_rng(0)) is None


def test_collect_names_the_problem_when_nothing_is_readable():
  class Broken:
    def __len__(self):
      return 3

    def __getitem__(self, i):
      raise OSError("unreadable")

  with pytest.raises(ValueError, match="no readable record among the 3 sampled"):
    values_lib.ValuePool.sample(Broken())


def test_pipeline_carries_the_swapped_caption(source, pool, tmp_path):
  captions = [schema.structured_text(source[i]).caption for i in range(len(source))]
  tok = tokenizer_lib.train(captions, str(tmp_path / "tokenizer.model"), 400)
  prep = pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=2, max_len=96,
                             db_min=-30.0, db_max=10.0, train=True, swap=True,
                             pool=pool)
  ex = prep.random_map((0, source[0]), np.random.default_rng(0))
  assert ex["has_swap"] == 1 and not np.array_equal(ex["swap_tokens"], ex["tokens"])
  assert ex["swap_tokens"][0] == caption_lib.ENC
  # the swap is a caption with one value changed: the template text is untouched
  template = ex["tokens"][ex["clause"] == caption_lib.TEMPLATE]
  assert set(template.tolist()) <= set(ex["swap_tokens"].tolist())
  with pytest.raises(ValueError, match="need train=True"):
    pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=2, max_len=96,
                        db_min=-30.0, db_max=10.0, train=False, swap=True, pool=pool)
  bad = prep.random_map((1, None), np.random.default_rng(0))
  assert bad["valid"] == 0 and bad["has_swap"] == 0 and not bad["swap_tokens"].any()
  # only clauses whose value starts within max_len are swapped; a swap that max_len cuts off
  # entirely leaves the tokens equal and is not a negative
  for max_len, least in ((24, 15), (4, 0)):
    short = pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=2,
                                max_len=max_len, db_min=-30.0, db_max=10.0, train=True,
                                swap=True, pool=pool)
    rows = [short.random_map((i, source[i]), np.random.default_rng(i)) for i in range(20)]
    for r in rows:
      assert r["has_swap"] == (not np.array_equal(r["swap_tokens"], r["tokens"]))
    assert sum(r["has_swap"] for r in rows) >= least
    if not least:
      assert not any(r["has_swap"] for r in rows)


def test_rivals_are_distinct_other_values_of_the_clauses_field(source, pool):
  rng = np.random.default_rng(0)
  st = schema.structured_text(source[0])
  for k, name in enumerate(st.field_names):
    others = set(pool.alternatives(st.family, name, st.values[k]))
    assert others <= set(pool.distinct(st.family, name)) - {st.values[k]}
    drawn = negatives.rivals(pool, st, k, 3, rng)
    assert len(drawn) == len(set(drawn)) == min(3, len(others))
    assert set(drawn) <= others
  sizes = {k: len(pool.alternatives(st.family, n, st.values[k]))
           for k, n in enumerate(st.field_names)}
  k = min((k for k in sizes if sizes[k] > 3), key=sizes.get)  # more values than one draw
  seen = set()
  for _ in range(60):  # uniform without replacement: over draws every other value turns up
    seen.update(negatives.rivals(pool, st, k, 2, rng))
  assert seen == set(pool.alternatives(st.family, st.field_names[k], st.values[k]))


def _counts(*values):
  """Target captions that differ only in their count value."""
  return [text_lib.compose("target", (v, "ships", "small", "the centre", "clustered", "sea",
                                      "ship", "land")) for v in values]


def test_the_pool_never_offers_a_rewording_of_the_clauses_own_value():
  """"three ships" says what "3" says (`content`): as another value of the count it would be a
  negative, rival, screen rival or rewrite that is not wrong."""
  sts = _counts("3", "three ships", "3 ships", "3 ships", "4 ships", "five", "5 ships", "five")
  pool = values_lib.ValuePool.from_texts(sts)
  assert pool.alternatives("target", "count", "3") == ["4 ships", "5 ships", "five"]
  assert pool.others(sts[0], 0, 8) == ["five", "4 ships", "5 ships"]  # most frequent first
  assert pool.others(sts[0], 0, 8, exclude=("5",)) == ["4 ships"]  # excluded in content too
  assert pool.others(sts[4], 0, 2) == ["3 ships", "five"]
  rng = np.random.default_rng(0)
  for _ in range(20):
    assert {content_lib.content("count", v) for v in negatives.rivals(pool, sts[1], 0, 8, rng)
            } == {"4", "5"}
    swapped = negatives.swap(pool, sts[2], rng)  # count is the only field with another value
    assert content_lib.content("count", swapped.values[0]) in {"4", "5"}
  reworded = values_lib.ValuePool.from_texts(_counts("3", "three ships", "3 ships"))
  assert not reworded.has_alternative("target", "count", "3")
  assert reworded.has_alternative("target", "count", "4")  # a value the pool has not seen
  assert negatives.swap(reworded, sts[0], rng) is None
  assert negatives.rivals(reworded, sts[0], 0, 4, rng) == []


def test_pipeline_carries_the_drawn_clauses_rivals(source, pool, tmp_path):
  captions = [schema.structured_text(source[i]).caption for i in range(len(source))]
  tok = tokenizer_lib.train(captions, str(tmp_path / "tokenizer.model"), 400)
  kw = dict(tokenizer_path=tok.path, image_size=32, channels=2, max_len=96, db_min=-30.0,
            db_max=10.0, train=True, clause_len=40)
  prep = pipeline.Preprocess(**kw, rivals=3, pool=pool)
  for i in range(10):
    st = schema.structured_text(source[i])
    clauses = {tuple(tok.encode_text(caption_lib.PREFIXES[n] + v, 40)): (n, v)
               for n in st.field_names for v in pool.distinct(st.family, n)}
    ex = prep.random_map((i, source[i]), np.random.default_rng(i))
    assert ex["rival_tokens"].shape == (3, 40) and ex["has_rival"].shape == (3,)
    name, value = clauses[tuple(ex["clause_tokens"])]
    assert value == st.values[st.field_names.index(name)]
    rivals = [clauses[tuple(t)] for t, h in zip(ex["rival_tokens"], ex["has_rival"]) if h]
    assert rivals and all(n == name and v != value for n, v in rivals)
    assert len({v for _, v in rivals}) == len(rivals)
    assert not ex["rival_tokens"][ex["has_rival"] == 0].any()  # padding rows are zeros
  bad = prep.random_map((1, None), np.random.default_rng(0))
  assert bad["valid"] == 0 and not bad["has_rival"].any() and bad["rival_tokens"].shape == (3, 40)
  # a rival that clause_len cuts off to the clause's own tokens is not a rival
  short = pipeline.Preprocess(**{**kw, "clause_len": 3}, rivals=3, pool=pool)
  ex = short.random_map((0, source[0]), np.random.default_rng(0))
  assert not ex["has_rival"].any()
  with pytest.raises(ValueError, match="need clause_len > 0"):
    pipeline.Preprocess(**{**kw, "clause_len": 0}, rivals=3, pool=pool)
  with pytest.raises(ValueError, match="pass pool="):
    pipeline.Preprocess(**kw, rivals=3)
