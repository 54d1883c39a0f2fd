"""bench/learning.py: the learning benchmark on the session's smoke run, and the repetition
measure it reports for captioning (evals/captioning.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from evals import captioning
from klip.data import caption as caption_lib
from klip.data import simulator
from klip.hcot import generator
from tests.conftest import SHARED_DATA, real_archives


def _caption(family, values):
  names = caption_lib.FAMILIES[family]
  return caption_lib.SEPARATOR.join(caption_lib.PREFIXES[n] + v for n, v in zip(names, values))


def test_repeats_counts_three_identical_tokens_in_a_row():
  assert captioning.repeats("ships ships ships")
  assert captioning.repeats("the top of of of the image")
  assert captioning.repeats("The, the THE ships")  # tokens as `normalize` cuts them
  assert captioning.repeats("a b b b b")  # a longer run too
  assert not captioning.repeats("of of the image of")  # twice in a row, three times in all
  assert not captioning.repeats("left, top left and bottom left")
  assert not captioning.repeats("")
  assert captioning.repeats("a a", run=2) and not captioning.repeats("a b a", run=2)


def test_repeats_counts_a_phrase_three_times_in_a_row():
  assert captioning.repeats("the port area of the port area of the port area of Osaka")
  assert captioning.repeats("top left, top left, top left")
  assert not captioning.repeats("the port area of the port area of Osaka")  # twice
  assert not captioning.repeats("a b a b a")  # two and a half
  assert not captioning.repeats("a b c d e a b c d e a b c d e")  # longer than REPEAT_NGRAM
  assert captioning.repeats("a b a b", run=2)


def test_no_reference_value_counts_as_repeating():
  """The measure flags the decoder's loops, not the generator's own phrasing."""
  gen = generator.Generator(generator.make_backend("rules"))
  values = [v for c in simulator.simulate(range(200), seed=0, size=64, num_channels=2,
                                                     workers=1)
            for v in gen.generate(c).text.values]
  assert values and not [v for v in values if captioning.repeats(v)]


def test_repetition_is_the_share_of_non_empty_values():
  values = ["coastal plain", "port port port", "", "a grid", "sharp sharp", "", "", "x x x x"]
  got = captioning.repetition([_caption("landform", values)], ["landform"])
  np.testing.assert_array_equal(got, [0, 1, 0, 0, 1])  # five non-empty values, two repeat
  both = captioning.repetition([_caption("landform", values), _caption("target", ["3"] * 8)],
                               ["landform", "target"])
  assert both.shape == (13,) and both.sum() == 2


@pytest.mark.slow
@real_archives
def test_learning_bench_on_the_smoke_run(smoke_run, tmp_path, capsys):
  from bench import learning  # pylint: disable=g-import-not-at-top
  from bench import learning_tasks  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(smoke_run[0], workdir)  # the bench writes bench_learning/ into its workdir
  results = tmp_path / "RESULTS.md"
  out = learning.run(workdir, ceiling_seconds=2.0, max_examples=48, caption_examples=4,
                     batch_size=16, source_root=SHARED_DATA, prepare_workers=2,
                     results=str(results),
                     out_dir=str(tmp_path / "out"), command="python -m bench.learning (test)")
  printed = capsys.readouterr().out
  rows = {r["task"]: r for r in out["rows"]}
  assert list(rows) == [t.name for t in learning_tasks.TASKS]
  real = {"mstar_subtype": "mstar", "opensarship_subtype": "opensarship"}
  for name, row in rows.items():
    assert name in printed
    if row.get("skipped"):  # only a real archive that is absent may be skipped
      assert name in real and not os.path.exists(os.path.join(SHARED_DATA, real[name])), row
      continue
    for key in ("probe", "knn", "pixel_probe", "random_probe", "ceiling", "chance"):
      assert 0.0 <= row[key] <= 1.0, (name, key, row)
    assert row["zeroshot"] == "n/a" or 0.0 <= row["zeroshot"] <= 1.0
    assert row["n_train"] > 0 and row["n_test"] > 0
    assert row["chance"] >= 1.0 / row["classes"] - 1e-9
  assert out["ceiling"]["steps"] >= 1 and out["budget_seconds"] == 2.0
  cap = out["captioning"]
  assert set(cap["fields"]) <= set(caption_lib.OBSERVABLE_FIELDS) and cap["fields"]
  assert 0.0 <= cap["repetition"] <= 1.0
  lines = [l for l in results.read_text().splitlines() if l.startswith("| ")]
  assert len(lines) == len(learning_tasks.TASKS) + 1
  assert all("variant=smoke; step=10; commit=" in l and "; fit=held_out; " in l for l in lines)
  assert 0.0 <= cap["constant_mean"] <= 1.0 and set(cap["constant"]) == set(cap["fields"])
  assert set(cap["content_fields"]) == set(cap["fields"])  # the same fields, read for content
  assert 0.0 <= cap["content_observable_mean"] <= 1.0
  assert set(cap["content_constant"]) == set(cap["fields"])
  assert os.path.exists(tmp_path / "out" / "learning.json")


def test_pretrain_seconds_from_logged_rates(tmp_path):
  from bench import learning  # pylint: disable=g-import-not-at-top
  from bench import learning_tasks  # pylint: disable=g-import-not-at-top
  rows = [{"step": 10}, {"step": 20, "perf/steps_per_s": 2.0},
          {"step": 30, "perf/steps_per_s": 1.0},  # a resumed invocation's first row:
          {"step": 40}, {"step": 50, "perf/steps_per_s": 2.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  seconds, how = learning.pretrain_seconds(str(tmp_path))
  known = 5.0 + 10.0 + 5.0  # 30 steps at their rates; 20 at the mean step time 20 / 30
  assert seconds == pytest.approx(known + 20 * known / 30)
  assert "50 steps" in how
  with pytest.raises(SystemExit, match="no finished checkpoint"):
    learning.latest_step(str(tmp_path))
