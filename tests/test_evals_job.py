"""The eval job: ledger, finished-steps-only, fault isolation, held-out checks, and a full
`--once` run of every evaluator on a smoke checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import SHARED_DATA, eval_config, real_archives
from evals import data as data_lib
from evals import job as job_lib
from klip.data import dataset as dataset_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = "tests.eval_fakes"


def _fake_config(data_dir, **evals):
  c = eval_config(data_dir)
  c.unlock()
  c.evals = evals or {"fake": {"type": FAKE}}
  c.lock()
  return c


@pytest.fixture()
def workdir(smoke_run, tmp_path):
  """A copy of the smoke run (checkpoints at steps 5 and 10) to evaluate."""
  path = str(tmp_path / "run")
  shutil.copytree(smoke_run[0], path)
  return path


def test_ledger_skips_done_steps_and_outputs_are_written(workdir, data_dir):
  job = job_lib.Job(_fake_config(data_dir), workdir)
  assert job.pending() == [5, 10]
  for step in job.pending():
    row = job.evaluate(step)
    assert row["metrics"]["fake/step"] == step and not row["failed"]
  assert job.pending() == [] and job.ledger.done == [5, 10]
  # a new job on the same workdir reads the ledger and has nothing to do
  again = job_lib.Job(_fake_config(data_dir), workdir)
  assert again.pending() == []
  with open(os.path.join(workdir, "eval", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [5, 10]
  score = rows[0]["metrics"]
  assert score["fake/score/ci_low"] <= score["fake/score"] <= score["fake/score/ci_high"]
  assert os.listdir(os.path.join(workdir, "eval", "tb"))
  index = open(os.path.join(workdir, "eval", "report.md")).read()
  assert "fake/score" in index and "step 5" in index and "step 10" in index
  assert "examples" in open(os.path.join(workdir, "eval", "step_10", "report.md")).read()


def test_step_being_written_is_never_read(workdir, data_dir):
  checkpoints = os.path.join(workdir, "checkpoints")
  # what Orbax leaves while step 15 is still being saved: a temporary directory
  partial = os.path.join(checkpoints, "15.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(checkpoints, "10"), partial)
  job = job_lib.Job(_fake_config(data_dir), workdir)
  assert job.pending() == [5, 10]


def test_checkpoint_that_fails_to_restore_is_retried(workdir, data_dir, capsys):
  state = os.path.join(workdir, "checkpoints", "10", "state")
  saved = str(state) + ".bak"
  os.rename(state, saved)
  job = job_lib.Job(_fake_config(data_dir), workdir)
  assert job.evaluate(10) is None
  assert "did not restore" in capsys.readouterr().out
  assert 10 not in job.ledger and 10 in job.pending()
  os.rename(saved, state)  # the next poll succeeds
  assert job.evaluate(10) is not None and 10 in job.ledger


def test_steps_the_run_no_longer_has_are_recorded_as_missed(workdir, data_dir):
  checkpoints = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(checkpoints, "5"))  # what rotation does before the job gets there
  job = job_lib.Job(_fake_config(data_dir), workdir)
  assert job.pending() == [10]
  assert "checkpoint rotation" in job.ledger.missed[5] and '"keep": 3' in job.ledger.missed[5]
  assert 5 in job.ledger and 5 not in job.ledger.done
  job.evaluate(10)
  index = open(os.path.join(workdir, "eval", "report.md")).read()
  assert "Steps missed (1)" in index and "- 5: deleted by checkpoint rotation" in index
  # a restarted job reads the missed step from the ledger and has nothing to do
  again = job_lib.Job(_fake_config(data_dir), workdir)
  assert again.pending() == [] and list(again.ledger.missed) == [5]
  # a step the trainer set aside as damaged is missed with that reason
  aside = os.path.join(workdir, "checkpoints_skipped")
  os.makedirs(aside)
  os.rename(os.path.join(checkpoints, "10"), os.path.join(aside, "10"))
  shutil.rmtree(os.path.join(workdir, "eval"))
  third = job_lib.Job(_fake_config(data_dir), workdir)
  assert third.pending() == []
  assert third.ledger.missed[10].startswith("set aside as damaged")


def test_a_step_deleted_while_it_restores_is_missed_not_retried(workdir, data_dir, monkeypatch,
                                                                capsys):
  def restore_as_rotation_deletes(wd, step, **kwargs):
    del kwargs
    shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
    raise FileNotFoundError(f"{wd}/checkpoints/{step}/state")
  monkeypatch.setattr(job_lib.Predictor, "restore", restore_as_rotation_deletes)
  job = job_lib.Job(_fake_config(data_dir), workdir)
  assert job.evaluate(5) is None
  assert "deleted while the job restored it" in job.ledger.missed[5]
  assert "retried" not in capsys.readouterr().out and not job.restore_failures


def _once(workdir, data_dir):
  return subprocess.run(
      [sys.executable, "-m", "evals.run", "--config=tests/eval_fake_config.py",
       f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--once"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_once_exits_1_when_there_is_nothing_it_could_evaluate(workdir, data_dir, tmp_path):
  not_a_run = _once(tmp_path / "nothing", data_dir)
  assert not_a_run.returncode == 1, not_a_run.stdout + not_a_run.stderr
  assert "is not a KLIP training workdir (no config.json)" in not_a_run.stderr
  for step in ("5", "10"):  # every step fails to restore
    os.rename(os.path.join(workdir, "checkpoints", step, "state"),
              os.path.join(workdir, "checkpoints", step, "state.bak"))
  broken = _once(workdir, data_dir)
  assert broken.returncode == 1, broken.stdout + broken.stderr
  assert "2 step(s) did not restore" in broken.stderr


def test_failing_and_skipped_evaluators_do_not_stop_the_others(workdir, data_dir):
  c = _fake_config(data_dir, ok={"type": FAKE}, broken={"type": FAKE, "behaviour": "raise"},
                   absent={"type": FAKE, "data": "nowhere"})
  c.unlock()
  c.datasets.nowhere = {"name": "mstar/depression17", "source": "no/such/folder"}
  c.lock()
  row = job_lib.Job(c, workdir).evaluate(10)
  assert row["metrics"]["ok/step"] == 10
  assert "ZeroDivisionError: planted failure" in row["failed"]["broken"]
  assert "does not exist" in row["skipped"]["absent"]
  report = open(os.path.join(workdir, "eval", "step_10", "report.md")).read()
  assert "Traceback" in report and "skipped: " in report


def test_held_out_splits_are_checked_by_id(smoke_predictor, data_dir):
  c = eval_config(data_dir)
  pretrain = smoke_predictor.config.data
  datasets = data_lib.Datasets(c.datasets, data_dir=data_dir, source_root=c.source_root,
                               pretrain=pretrain)
  assert len(datasets.split("synthetic", "test")) > 0
  with pytest.raises(data_lib.HeldOutError, match="pretraining split"):
    datasets.split("synthetic", "train")
  # a dataset whose test split holds the pretraining examples is refused by id
  c.unlock()
  c.datasets.copy = {"name": c.datasets.synthetic.name, "source": ""}
  c.lock()
  leaky = data_lib.Datasets(c.datasets, data_dir=data_dir, source_root=c.source_root,
                            pretrain=pretrain.copy_and_resolve_references())
  leaky._pretrain_ids = set(leaky.split("copy", "test").ids)  # pylint: disable=protected-access
  leaky._cache.clear()  # pylint: disable=protected-access
  with pytest.raises(data_lib.HeldOutError, match="in the pretraining split"):
    leaky.split("copy", "test")


def test_missing_archive_source_names_the_path(smoke_predictor, tmp_path):
  c = eval_config(str(tmp_path), source_root=str(tmp_path / "nothing"))
  datasets = data_lib.Datasets(c.datasets, data_dir=str(tmp_path), source_root=c.source_root,
                               pretrain=smoke_predictor.config.data)
  with pytest.raises(dataset_lib.DatasetMissingError, match="nothing/mstar/train"):
    datasets.split("mstar", "test")


def _eval_cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "evals.run", "--config=configs/eval.py:smoke",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          f"--config.source_root={SHARED_DATA}", *extra]


@pytest.mark.slow
@real_archives
def test_once_runs_every_evaluator_on_a_smoke_checkpoint(workdir, data_dir):
  """The CI run of the whole suite: every evaluator of the smoke config, one invocation."""
  out = subprocess.run(_eval_cmd(workdir, data_dir, "--once", "--step=10"), cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "metrics.jsonl")) as f:
    row = json.loads(f.readlines()[-1])
  assert row["step"] == 10
  assert not row["failed"], row["failed"]
  if os.path.isdir(SHARED_DATA):
    # the shared data holds MSTAR's 17-degree collection only: the SOC test collection
    # (15 degrees) is the user's own copy, so mstar_soc may be skipped for its absence alone
    skipped = dict(row["skipped"])
    soc = skipped.pop("mstar_soc", "")
    assert not soc or ("mstar15" in soc and "does not exist" in soc), soc
    assert not skipped, skipped
  else:
    print(f"real-archive evaluators skipped: {SHARED_DATA} is absent: {row['skipped']}")
  from configs import eval as eval_lib  # pylint: disable=g-import-not-at-top
  ran = {name.split("/")[0] for name in row["metrics"]} | set(row["skipped"])
  assert ran == set(eval_lib.get_config("smoke").evals)


@pytest.mark.slow
def test_watches_a_run_while_it_trains(data_dir, tmp_path):
  """Training and the eval job in two processes on one workdir: every saved step is
  evaluated once, the watcher stops after the run's last step."""
  workdir = str(tmp_path / "live")
  train = subprocess.Popen(
      [sys.executable, "-m", "klip.train", "--config=configs/pretrain.py:smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       "--config.total_steps=20", "--config.checkpoint.keep=10"], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(workdir, "config.json")):
    assert train.poll() is None and time.time() < deadline, train.stdout.read()
    time.sleep(0.2)
  watcher = subprocess.run(
      [sys.executable, "-m", "evals.run", "--config=tests/eval_fake_config.py",
       f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.poll_seconds=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert train.wait(timeout=600) == 0, train.stdout.read()
  assert watcher.returncode == 0, watcher.stdout[-3000:] + watcher.stderr[-3000:]
  assert "the run's last" in watcher.stdout
  with open(os.path.join(workdir, "eval", "ledger.json")) as f:
    assert sorted(map(int, json.load(f)["done"])) == [5, 10, 15, 20]
  with open(os.path.join(workdir, "eval", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert sorted(steps) == [5, 10, 15, 20]  # each step once


@pytest.mark.slow
def test_a_watcher_that_falls_behind_keeps_the_preserved_steps_and_names_the_missed(
    data_dir, tmp_path):
  """Saved every step with keep=1: the steps divisible by keep_period survive for the
  watcher, which was started before the run had a config.json; every other step is evaluated
  or recorded as missed, never silently lost."""
  workdir = str(tmp_path / "fast")
  watcher = subprocess.Popen(
      [sys.executable, "-m", "evals.run", "--config=tests/eval_fake_config.py",
       f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.poll_seconds=1"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  time.sleep(2)
  train = subprocess.run(
      [sys.executable, "-m", "klip.train", "--config=configs/pretrain.py:smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.total_steps=20",
       "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=1",
       "--config.checkpoint.keep_period=5"], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
  out, _ = watcher.communicate(timeout=600)
  assert watcher.returncode == 0, out[-3000:]
  assert "waiting for the run to start" in out and "the run's last" in out
  with open(os.path.join(workdir, "eval", "ledger.json")) as f:
    ledger = json.load(f)
  done, missed = set(map(int, ledger["done"])), set(map(int, ledger["missed"]))
  assert {5, 10, 15, 20} <= done
  assert done | missed == set(range(1, 21)) and not done & missed
  # deleted before the watcher looked, or while it restored the step
  assert all("rotation" in why or "deleted while the job restored it" in why
             for why in ledger["missed"].values()), ledger["missed"]


def test_a_rerun_of_one_evaluator_replaces_only_its_metrics(workdir, data_dir):
  c = _fake_config(data_dir, a={"type": FAKE}, b={"type": FAKE, "behaviour": "raise"})
  job = job_lib.Job(c, workdir)
  job.evaluate(10)
  c.unlock()
  c.evals.b.behaviour = "ok"
  c.lock()
  job.evaluate(10, only=["b"])
  (row,) = [r for r in job.rows() if r["step"] == 10]
  assert row["metrics"]["a/step"] == 10 and row["metrics"]["b/step"] == 10
  assert not row["failed"]


def test_split_image_tokens_are_the_image_towers(smoke_predictor, eval_datasets):
  import numpy as np  # pylint: disable=g-import-not-at-top
  split = eval_datasets.split("synthetic", "test")
  direct = smoke_predictor.image_tokens(smoke_predictor.images(split.records))
  np.testing.assert_allclose(smoke_predictor.split_image_tokens(split), direct, atol=1e-5)
