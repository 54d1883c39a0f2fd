"""Clause-swap negatives: the value pool, the swap, the pipeline's swapped captions."""

import numpy as np
import pytest

from klip.data import caption as caption_lib
from klip.data import dataset as dataset_lib
from klip.data import negatives
from klip.data import pipeline
from klip.data import schema
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
                             db_min=-30.0, db_max=10.0, train=True, negatives=pool)
  ex = prep.random_map((0, source[0]), np.random.default_rng(0))
  assert ex["has_swap"] == 1 and not np.array_equal(ex["swap_tokens"], ex["tokens"])
  assert ex["swap_tokens"][0] == caption_lib.ENC
  # the swap is a caption with one value changed: the template text is untouched
  template = ex["tokens"][ex["clause"] == caption_lib.TEMPLATE]
  assert set(template.tolist()) <= set(ex["swap_tokens"].tolist())
  with pytest.raises(ValueError, match="need train=True"):
    pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=2, max_len=96,
                        db_min=-30.0, db_max=10.0, train=False, negatives=pool)
  bad = prep.random_map((1, None), np.random.default_rng(0))
  assert bad["valid"] == 0 and bad["has_swap"] == 0 and not bad["swap_tokens"].any()
  # only clauses whose value starts within max_len are swapped; a swap that max_len cuts off
  # entirely leaves the tokens equal and is not a negative
  for max_len, least in ((24, 15), (4, 0)):
    short = pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=2,
                                max_len=max_len, db_min=-30.0, db_max=10.0, train=True,
                                negatives=pool)
    rows = [short.random_map((i, source[i]), np.random.default_rng(i)) for i in range(20)]
    for r in rows:
      assert r["has_swap"] == (not np.array_equal(r["swap_tokens"], r["tokens"]))
    assert sum(r["has_swap"] for r in rows) >= least
    if not least:
      assert not any(r["has_swap"] for r in rows)
