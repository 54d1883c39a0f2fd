"""Records, splits, tokenizer and the Grain pipeline."""

import json
import os

import numpy as np
import pytest

from conftest import SMOKE_CHIPS
from klip.data import caption as caption_lib
from klip.data import dataset as dataset_lib
from klip.data import pipeline
from klip.data import schema
from klip.data import simulator
from klip.data import splits
from klip.data import text as text_lib
from klip.data import tokenizer as tokenizer_lib
from klip.hcot import generator

NAME = "synthetic/n160_s32_c2_seed0"


@pytest.fixture(scope="module")
def tok(data_dir, tmp_path_factory):
  src = dataset_lib.source(data_dir, NAME, "train")
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  captions = [schema.structured_text(src[i]).caption for i in range(len(src))]
  return tokenizer_lib.train(captions, path, 400)


def _preprocess(tok, train=True):
  return pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=2, max_len=64,
                             db_min=-30.0, db_max=10.0, train=train, gain_db=1.0)


def test_build_writes_every_chip_once_split_by_city(data_dir):
  b = dataset_lib.builder(data_dir, NAME)
  sizes = {s: b.info.splits[s].num_examples for s in b.info.splits}
  assert sum(sizes.values()) == SMOKE_CHIPS and sizes["train"] > sizes.get("test", 0) > 0
  cities = {}
  ids = set()
  for split in sizes:
    src = dataset_lib.source(data_dir, NAME, split)
    for i in range(len(src)):
      r = src[i]
      ids.add(r["id"])
      assert r["split"].decode() == split
      cities.setdefault(r["city"].decode(), set()).add(split)
  assert len(ids) == SMOKE_CHIPS
  assert all(len(s) == 1 for s in cities.values()), "a city appears in two splits"
  with open(os.path.join(b.data_dir, "build_report.json")) as f:
    report = json.load(f)
  assert report["scene_leaks"] == []
  assert sum(r["examples"] for r in report["splits"].values()) == SMOKE_CHIPS


def test_record_roundtrip_matches_the_simulated_chip(data_dir):
  src = dataset_lib.source(data_dir, NAME, "train")
  r = src[0]
  index = int(r["id"].decode().rsplit("-", 1)[1])
  chip = simulator.simulate_chip(index, seed=0, size=32, num_channels=2)
  assert r["id"].decode() == chip.id
  db = schema.decode_image(r)
  expected = np.clip(chip.image_db, schema.DB_MIN, schema.DB_MAX)
  assert np.abs(db - expected).max() <= schema.DB_SCALE / 2 + 1e-4
  np.testing.assert_array_equal(schema.decode_landcover(r), chip.landcover)
  st = schema.structured_text(r)
  assert st == generator.Generator(generator.make_backend("rules")).generate(chip).text
  for value, (a, b) in zip(st.values, st.spans):
    assert st.caption[a:b] == value
  assert len(r["instance_boxes"]) == len(chip.instances) == len(r["instance_categories"])


def test_splits_are_stable_and_disjoint():
  scenes = [f"scene{i}" for i in range(50)]
  a = splits.assign(scenes, 0.1, 0.2)
  b = splits.assign(list(reversed(scenes)) * 2, 0.1, 0.2)
  assert a == b
  assert sorted(a.values()).count("test") == 10 and sorted(a.values()).count("val") == 5
  assert splits.assign(["only"], 0.5, 0.4) == {"only": "train"}


def test_tokenizer_reserves_specials_and_marks_value_spans_exactly(tok):
  st = text_lib.compose("target", ("3 ships", "the top left", "bright points with wakes",
                                   "about 120 m long", "cargo ships", "scattered",
                                   "port of Rotterdam", "calm sea"))
  ids, clause = tok.encode_caption(st, 200)
  assert ids[0] == caption_lib.ENC and (ids == caption_lib.SEP).sum() == 7
  for i, value in enumerate(st.values):
    assert tok.decode(ids[clause == i]) == value
  assert tok.decode(ids) == st.caption.replace(" $ ", " ")
  short, short_clause = tok.encode_caption(st, 10)
  assert short.shape == (10,) and short_clause.shape == (10,)
  # byte fallback: nothing is unknown
  odd, _ = tok.encode_caption(text_lib.compose("target", ("Ωmega",) * 8), 200)
  assert caption_lib.UNK not in odd


def test_tokenizer_rejects_a_foreign_model(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(f"plain text number {i}" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                 vocab_size=40, minloglevel=2)
  with pytest.raises(ValueError, match="not a KLIP tokenizer"):
    tokenizer_lib.Tokenizer(str(tmp_path / "m.model"))


def _batches(data_dir, tok, *, start=0, process_index=0, process_count=1, n=3, batch=8):
  src = dataset_lib.source(data_dir, NAME, "train")
  it = pipeline.local_batches(src, _preprocess(tok), seed=0, global_batch=batch,
                              start_example=start, process_index=process_index,
                              process_count=process_count, num_threads=0)
  return [next(it) for _ in range(n)]


def test_global_batch_is_the_same_whatever_the_process_count(data_dir, tok):
  one = _batches(data_dir, tok)
  two = [_batches(data_dir, tok, process_index=p, process_count=2) for p in range(2)]
  for step in range(3):
    assert one[step]["image"].shape == (8, 32, 32, 2)
    merged = np.concatenate([two[0][step]["index"], two[1][step]["index"]])
    np.testing.assert_array_equal(one[step]["index"], merged)
    np.testing.assert_array_equal(
        one[step]["image"], np.concatenate([two[0][step]["image"], two[1][step]["image"]]))


def test_resuming_at_a_position_continues_the_stream(data_dir, tok):
  straight = _batches(data_dir, tok, n=4)
  resumed = _batches(data_dir, tok, start=16, n=2)
  for a, b in zip(straight[2:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_epochs_reshuffle_and_cover_every_example(data_dir, tok):
  n = len(dataset_lib.source(data_dir, NAME, "train"))
  batches = _batches(data_dir, tok, n=2 * n // 8 + 1)
  seen = np.concatenate([b["index"] for b in batches])
  assert sorted(seen[:n]) == list(range(n))
  assert not np.array_equal(seen[:n], seen[n:2 * n])


def test_preprocess_normalises_and_tokenizes(data_dir, tok):
  src = dataset_lib.source(data_dir, NAME, "train")
  ex = _preprocess(tok, train=False).random_map((0, src[0]), np.random.default_rng(0))
  assert ex["valid"] == 1 and ex["image"].dtype == np.float32
  assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
  assert ex["tokens"][0] == caption_lib.ENC and ex["clause"].max() >= 0


class _FlakySource:
  """Raises for one index; returns a record with a corrupt PNG for another."""

  def __init__(self, source, bad_read, bad_image):
    self._source, self._bad_read, self._bad_image = source, bad_read, bad_image

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if i == self._bad_read:
      raise OSError("simulated read failure")
    r = self._source[i]
    if i == self._bad_image:
      r = dict(r, image=r["image"][:40])
    return r


def test_corrupt_records_are_skipped_and_counted_not_fatal(data_dir, tok):
  src = _FlakySource(dataset_lib.source(data_dir, NAME, "train"), bad_read=3, bad_image=5)
  it = pipeline.local_batches(src, _preprocess(tok), seed=0, global_batch=len(src),
                              start_example=0, num_threads=0)
  batch = next(it)
  invalid = sorted(batch["index"][batch["valid"] == 0])
  assert invalid == [3, 5]
  assert np.all(batch["image"][batch["valid"] == 0] == 0)
  assert batch["valid"].sum() == len(src) - 2


def test_worker_processes_deliver_the_same_batches(data_dir, tok):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  src = dataset_lib.source(data_dir, NAME, "train")
  base = _batches(data_dir, tok, n=3)
  it = pipeline.local_batches(src, _preprocess(tok), seed=0, global_batch=8, start_example=0,
                              num_workers=2, num_threads=0)
  for expected in base:
    got = next(it)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])


def test_free_text_encoding_matches_the_caption_encoding(data_dir, tok):
  st = schema.structured_text(dataset_lib.source(data_dir, NAME, "test")[0])
  ids, _ = tok.encode_caption(st, 64)
  np.testing.assert_array_equal(tok.encode_text(st.caption, 64), ids)
  short = tok.encode_text("a SAR image of a ship", 64)
  assert short[0] == caption_lib.ENC and caption_lib.SEP not in short
  assert np.all(short[np.flatnonzero(short == caption_lib.PAD)[0]:] == caption_lib.PAD)


def test_a_mixture_is_the_concatenation_of_its_parts(data_dir):
  train = dataset_lib.source(data_dir, NAME, "train")
  test = dataset_lib.source(data_dir, NAME, "test")
  both = dataset_lib.ConcatSource([train, test])
  assert len(both) == len(train) + len(test)
  assert both[len(train) - 1]["id"] == train[len(train) - 1]["id"]
  assert both[len(train)]["id"] == test[0]["id"]
  with pytest.raises(IndexError):
    both[len(both)]  # pylint: disable=pointless-statement
  mix = dataset_lib.source(data_dir, f"{NAME}+{NAME}", "test")
  assert len(mix) == 2 * len(test) and mix[len(test)]["id"] == test[0]["id"]
  assert dataset_lib.fingerprint(data_dir, f"{NAME}+{NAME}") not in (
      dataset_lib.fingerprint(data_dir, NAME), "")
  with pytest.raises(dataset_lib.DatasetMissingError, match="--source="):
    dataset_lib.source(data_dir, f"{NAME}+mstar/depression17", "test")


def test_vertical_flip_mirrors_position_words_only():
  target = text_lib.compose("target", (
      "3", "the top left, centre and bottom right of the image", "bright points on top", "10 m",
      "ship", "scattered", "the port of X", "open water"))
  flipped = text_lib.flip_vertical(target)
  assert flipped.values[1] == "the bottom left, centre and top right of the image"
  assert flipped.values[2] == "bright points on top"  # not a position field
  assert flipped.values[0] == target.values[0] and flipped.spans != ()
  assert text_lib.flip_vertical(flipped) == target
  land = text_lib.compose("landform", (
      "a plain", "farming", "vegetation (60 %) with water (40 %)",
      "vegetation towards the top and open water towards the bottom left", "smooth", "absent",
      "absent", "a river"))
  assert text_lib.flip_vertical(land).values[3] == (
      "vegetation towards the bottom and open water towards the top left")
  centred = text_lib.compose("target", ("1", "the centre of the image", "a", "b", "c", "d",
                                        "e", "f"))
  assert text_lib.flip_vertical(centred) is centred


def test_training_flip_keeps_image_and_position_words_consistent(data_dir, tok):
  src = dataset_lib.source(data_dir, NAME, "train")
  plain = _preprocess(tok)  # max_len long enough to reach the position clause of either family
  flip = pipeline.Preprocess(**{**plain.__dict__, "flip_p": 1.0, "gain_db": 0.0, "max_len": 256})
  still = pipeline.Preprocess(**{**plain.__dict__, "gain_db": 0.0, "max_len": 256})
  for i in range(len(src)):
    r = src[i]
    st = schema.structured_text(r)
    if "top" in st.values[st.field_names.index("location" if st.family == "target"
                                                   else "layout")]:
      break
  else:
    pytest.fail("no smoke chip names a top position")
  a = still.random_map((i, r), np.random.default_rng(1))
  b = flip.random_map((i, r), np.random.default_rng(1))
  np.testing.assert_array_equal(b["image"], a["image"][::-1])
  want, _ = tok.encode_caption(text_lib.flip_vertical(st), 256)
  np.testing.assert_array_equal(b["tokens"], want)
  assert not np.array_equal(a["tokens"], b["tokens"])


def test_training_crops_stay_within_max_shift_of_the_centre(tok):
  prep = pipeline.Preprocess(tokenizer_path=tok.path, image_size=32, channels=1, max_len=64,
                             db_min=-30.0, db_max=10.0, train=True, max_shift=4)
  db = np.arange(96 * 96, dtype=np.float32).reshape(96, 96, 1)  # each pixel its own index
  rng = np.random.default_rng(0)
  offsets = set()
  for _ in range(200):
    crop = prep._fit(db, rng)  # pylint: disable=protected-access
    offsets.add(divmod(int(crop[0, 0, 0]), 96))
  ys, xs = zip(*offsets)
  assert min(ys) >= 28 and max(ys) <= 36 and min(xs) >= 28 and max(xs) <= 36
  assert len(offsets) > 20  # still random within the bound


def test_clause_tokens_are_one_observable_clause_never_the_skipped_one(data_dir, tok):
  src = dataset_lib.source(data_dir, NAME, "train")
  prep = pipeline.Preprocess(**{**_preprocess(tok).__dict__, "clause_len": 40})
  r = src[0]
  st = schema.structured_text(r)
  from klip.data import caption as caption_lib  # pylint: disable=g-import-not-at-top
  observable = [i for i, n in enumerate(st.field_names) if n in caption_lib.OBSERVABLE_FIELDS]
  forms = {tuple(tok.encode_text(caption_lib.PREFIXES[st.field_names[i]] + st.values[i], 40)): i
           for i in observable}
  drawn = set()
  for seed in range(40):
    out = prep.random_map((0, r), np.random.default_rng(seed))
    assert out["clause_tokens"].shape == (40,)
    drawn.add(forms[tuple(out["clause_tokens"])])
  assert len(drawn) > 1 and drawn <= set(observable)
  skip = observable[0]
  rng = np.random.default_rng(0)
  assert all(pipeline._random_clause(st, rng, skip) != skip  # pylint: disable=protected-access
             for _ in range(40))
  assert prep.random_map((0, None), rng)["clause_tokens"].shape == (40,)
