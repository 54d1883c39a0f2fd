"""The fault matrix: each fault (klip/faults.py plants it through KLIP_FAULTS) ends, after the
same command is run again, with the parameters and metrics rows of the uninterrupted run, or
with a clear error that leaves the workdir as it was.

  SIGKILL inside a train step, inside an async save, inside a SCIO rescoring pass, inside an
  eval; SIGTERM on a save step; the latest checkpoint damaged; the disk full while saving; a
  resume that would change the run; a torn metrics row."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import smoke_config
from evals import job as job_lib
from klip import checkpoint as checkpoint_lib
from klip import faults
from klip import metrics_writer
from klip import train
from scio_support import SCIO, saved_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, data_dir, *overrides):
  return [sys.executable, "-m", "klip.train", "--config=configs/pretrain.py:smoke",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]


def _env(fault: str | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != faults.ENV}
  env["PYTHONUNBUFFERED"] = "1"
  if fault:
    env[faults.ENV] = fault
  return env


def _run(workdir, data_dir, *overrides, fault=None):
  return subprocess.run(_cli(workdir, data_dir, *overrides), cwd=ROOT, env=_env(fault),
                        capture_output=True, text=True, timeout=900)


def _assert_same_run(reference: str, resumed: str, steps: int = 20):
  """Parameters bitwise equal; one metrics row per step with the same data and losses."""
  for x, y in zip(jax.tree.leaves(checkpoint_lib.read_params(reference)),
                  jax.tree.leaves(checkpoint_lib.read_params(resumed))):
    np.testing.assert_array_equal(x, y)
  ra, rb = _rows(reference), _rows(resumed)
  assert [r["step"] for r in rb] == list(range(1, steps + 1))
  for key in ("data/index_digest", "loss", "contrast/loss", "match/loss", "reconstruct/loss"):
    assert [r[key] for r in ra] == [r[key] for r in rb], key


MATRIX = ("--config.total_steps=20", "--config.checkpoint.every_steps=5")
SCIO_FLAGS = tuple(f"--config.scio.{k}={v}" for k, v in SCIO.items() if k != "initial_table") + (
    "--config.scio.fill_candidates=4",)  # the reconstruct passes also rank pool candidates


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """The matrix's reference: 20 smoke steps, saved every 5, never interrupted."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "w")
  out = _run(workdir, data_dir, *MATRIX)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def _rows(workdir):
  return metrics_writer.read(os.path.join(workdir, "metrics.jsonl"))


def _snapshot(workdir):
  """The bytes of the run's record and metrics, and its checkpoint steps."""
  out = {}
  for name in ("config.json", "metrics.jsonl"):
    with open(os.path.join(workdir, name), "rb") as f:
      out[name] = f.read()
  out["steps"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  return out


def _copy(smoke_run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(smoke_run[0], workdir)
  return workdir


def _damage(workdir, step):
  """Deletes the largest file of a step's saved state (as a lost or truncated write would)."""
  files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**"),
                                recursive=True) if os.path.isfile(f)]
  os.remove(max(files, key=os.path.getsize))


@pytest.mark.slow
def test_sigterm_on_a_save_step_exits_0_with_every_row(data_dir, tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.Popen(
      _cli(workdir, data_dir, "--config.total_steps=100000", "--config.checkpoint.every_steps=1"),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  deadline = time.time() + 300
  path = workdir / "metrics.jsonl"
  while not (path.exists() and len(path.read_text().splitlines()) >= 3) and (
      time.time() < deadline):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  step = int(stdout.split("SIGTERM: saving step ")[1].split()[0])
  assert [r["step"] for r in _rows(str(workdir))] == list(range(1, step + 1))
  assert str(step) in os.listdir(workdir / "checkpoints")
  assert f"KLIP run stopped by SIGTERM at step {step}" in stdout


@pytest.mark.slow
def test_kill_after_a_committed_save_loses_no_metrics_row(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  common = ["--config.total_steps=12", "--config.checkpoint.async_save=False"]
  out = _run(workdir, data_dir, *common, fault="kill_at_step=10")
  assert out.returncode == -9, out.stderr[-3000:]  # SIGKILL after step 10's save committed
  assert [r["step"] for r in _rows(workdir)] == list(range(1, 11))
  out = subprocess.run(_cli(workdir, data_dir, *common), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 10" in out.stdout
  assert [r["step"] for r in _rows(workdir)] == list(range(1, 13))


def test_damaged_latest_step_is_set_aside_and_the_one_before_restored(smoke_run, data_dir,
                                                                       tmp_path, capsys):
  workdir = _copy(smoke_run, tmp_path)
  _damage(workdir, 10)
  summary = train.train(smoke_config(data_dir), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 10 does not restore (" in out and "resumed from step 5" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints_skipped", "10"))
  assert summary["steps"] == 10
  a = checkpoint_lib.read_params(smoke_run[0])
  b = checkpoint_lib.read_params(workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # the same run as the one never damaged
  assert [r["loss"] for r in _rows(workdir)] == [r["loss"] for r in _rows(smoke_run[0])]


def test_every_step_damaged_is_a_clear_error(smoke_run, data_dir, tmp_path):
  workdir = _copy(smoke_run, tmp_path)
  for step in (5, 10):
    _damage(workdir, step)
  before = _snapshot(workdir)
  with pytest.raises(checkpoint_lib.NoRestorableCheckpoint, match="no checkpoint step under"):
    train.train(smoke_config(data_dir), workdir)
  after = _snapshot(workdir)
  assert after["config.json"] == before["config.json"]
  assert after["metrics.jsonl"] == before["metrics.jsonl"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints_skipped"))) == ["10", "5"]


def test_resume_with_another_model_changes_nothing(smoke_run, data_dir, tmp_path):
  workdir = _copy(smoke_run, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(checkpoint_lib.CheckpointMismatch,
                     match=r"step 10 .* saved by another model \(.*fc1"):
    train.train(smoke_config(data_dir, total_steps=12, **{"model.vit.mlp_dim": 96}), workdir)
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("override,message", [
    ({"seed": 1}, "seed=0"), ({"batch_size": 16}, "batch_size=8"),
    ({"schedule_steps": 20}, "schedule_steps=10")])
def test_resume_that_would_change_the_past_is_refused(smoke_run, data_dir, tmp_path, override,
                                                      message):
  workdir = _copy(smoke_run, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(train.ResumeMismatch, match=f"made with {message}"):
    train.train(smoke_config(data_dir, total_steps=12, **override), workdir)
  assert _snapshot(workdir) == before


def test_extending_a_finished_run_keeps_its_schedule(smoke_run, data_dir, tmp_path, capsys):
  workdir = _copy(smoke_run, tmp_path)
  train.train(smoke_config(data_dir, total_steps=13), workdir)
  assert "extending the run past its schedule (10 steps" in capsys.readouterr().out
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 14))
  assert rows[:10] == _rows(smoke_run[0])  # the past is as it was
  config = smoke_config(data_dir)
  final = config.optim.lr * config.optim.end_lr_fraction
  lrs = [r["learning_rate"] for r in rows]
  assert lrs[9] >= final  # step 10: the schedule's last step
  np.testing.assert_allclose(lrs[10:], final, rtol=1e-6)  # past it: the final rate
  with open(os.path.join(workdir, "config.json")) as f:
    record = json.load(f)
  assert record["config"]["schedule_steps"] == 10 and record["config"]["total_steps"] == 13


def test_a_refused_layout_leaves_no_workdir(data_dir, tmp_path):
  with pytest.raises(ValueError, match="does not divide over the 8 batch shards"):
    train.train(smoke_config(data_dir, batch_size=4), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


# ----- SIGKILL anywhere, then the same command -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_at_step=12", "kill_in_save_at_step=10"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, data_dir, tmp_path,
                                                          fault):
  workdir = str(tmp_path / "w")
  out = _run(workdir, data_dir, *MATRIX, fault=fault)
  assert out.returncode == -9, (out.returncode, out.stderr[-3000:])  # SIGKILL
  steps = checkpoint_lib.complete_steps(os.path.join(workdir, "checkpoints"))
  if fault.startswith("kill_in_save"):  # killed with step 10's save in flight, not committed
    assert steps == [5], steps
  out = _run(workdir, data_dir, *MATRIX)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {steps[-1]}" in out.stdout
  _assert_same_run(uninterrupted, workdir)


@pytest.mark.slow
def test_killed_in_a_rescoring_pass_resumes_to_the_uninterrupted_result(data_dir, tmp_path):
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  out = _run(straight, data_dir, *MATRIX, *SCIO_FLAGS)
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run(broken, data_dir, *MATRIX, *SCIO_FLAGS, fault="kill_in_pass_at_step=12")
  assert out.returncode == -9, (out.returncode, out.stderr[-3000:])  # SIGKILL inside the pass
  out = _run(broken, data_dir, *MATRIX, *SCIO_FLAGS)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(straight, broken)
  tables = [saved_tables(workdir) for workdir in (straight, broken)]
  assert tables[0] == tables[1] and tables[0]["active"]["version"] >= 1  # switched at an epoch
  rows, resumed = _rows(straight), _rows(broken)
  passes = [r for r in rows if "scio/pass_seconds" in r]
  assert [r["step"] for r in passes] == [4, 8, 12, 16, 20]
  assert {r["scio/stage"] for r in passes} == {1.0, 2.0}
  for key in ("scio/flag_rate", "scio/rewrite_rate", "scio/mean_score_change",
              "scio/wall_share"):
    assert all(np.isfinite(r[key]) for r in passes), key
  assert [r.get("scio/flag_rate") for r in rows] == [r.get("scio/flag_rate") for r in resumed]


def _eval(workdir, data_dir, fault=None):
  return subprocess.run(
      [sys.executable, "-m", "evals.run", "--config=tests/eval_fake_config.py",
       f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--once"],
      cwd=ROOT, env=_env(fault), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_killed_eval_job_resumes_to_the_uninterrupted_result(smoke_run, data_dir, tmp_path):
  """Killed after step 5's metrics row and before its ledger entry: the restarted job
  evaluates step 5 again and its merged rows and ledger are the uninterrupted job's."""
  straight, broken = (str(tmp_path / n) for n in ("straight", "broken"))
  for workdir in (straight, broken):
    shutil.copytree(smoke_run[0], workdir)
  assert _eval(straight, data_dir).returncode == 0
  out = _eval(broken, data_dir, fault="kill_in_eval_at_step=5")
  assert out.returncode == -9, (out.returncode, out.stderr[-3000:])
  out = _eval(broken, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {}
  for workdir in (straight, broken):  # the merged view the reports are made from
    rows[workdir] = [(r["step"], r["metrics"]) for r in
                     job_lib.merged_rows(os.path.join(workdir, "eval", "metrics.jsonl"))]
    with open(os.path.join(workdir, "eval", "ledger.json")) as f:
      assert sorted(map(int, json.load(f)["done"])) == [5, 10]
  assert rows[straight] == rows[broken] and [s for s, _ in rows[broken]] == [5, 10]


# ----- the disk fills up while saving ----------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
  """A 64 MiB tmpfs (mounting needs root or CAP_SYS_ADMIN; without it the test says so)."""
  mount = tmp_path / "small"
  mount.mkdir()
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip(f"cannot mount a size-limited tmpfs here ({out.stderr.strip()}): the disk-full "
                "case needs root or CAP_SYS_ADMIN")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_disk_full_while_saving_is_one_clear_line_and_loses_nothing(uninterrupted, data_dir,
                                                                     small_disk):
  workdir = str(small_disk / "w")
  out = _run(workdir, data_dir, *MATRIX, fault="fill_disk_at_step=10")
  assert out.returncode == 1, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if not line.startswith("W")]  # warnings
  assert len(lines) == 1 and lines[0].startswith("KLIP run stopped: no space left on device"), (
      out.stderr[-3000:])
  assert "the newest complete checkpoint is step 5" in lines[0]
  assert checkpoint_lib.complete_steps(os.path.join(workdir, "checkpoints")) == [5]
  os.remove(os.path.join(workdir, faults.BALLAST))  # space freed
  out = _run(workdir, data_dir, *MATRIX)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 5" in out.stdout
  _assert_same_run(uninterrupted, workdir)


def test_a_torn_last_metrics_row_is_dropped_and_any_other_bad_row_named(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
  assert metrics_writer.read(str(path)) == [{"step": 1, "loss": 2.0}]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:1: not a JSON metrics row"):
    metrics_writer.read(str(path))


def test_a_misspelt_fault_is_an_error_not_a_run_without_it(monkeypatch):
  monkeypatch.setenv(faults.ENV, "kill_at_stpe=3")
  with pytest.raises(ValueError, match="is not NAME=STEP"):
    faults.planned("kill_at_step")
  monkeypatch.delenv(faults.ENV)
  assert faults.planned("kill_at_step") is None
