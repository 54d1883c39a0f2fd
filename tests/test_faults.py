"""The fault matrix of the trainer: each fault ends with nothing lost, or a clear error that
leaves the workdir as it was."""

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
from klip import checkpoint as checkpoint_lib
from klip import metrics_writer
from klip import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, data_dir, *overrides):
  return [sys.executable, "-m", "klip.train", "--config=configs/pretrain.py:smoke",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]


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
  out = subprocess.run(_cli(workdir, data_dir, *common, "--config.debug.exit_at_step=10"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
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
                     match=r"step 10 .* saved by another model \(.*posemb"):
    train.train(smoke_config(data_dir, total_steps=12, **{"model.image_size": 64}), workdir)
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
