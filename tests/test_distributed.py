"""Multi-process training: joining plans, mesh layouts, and 2 processes x 2 CPU devices against
1 process x 4 devices (same losses and parameters; checkpoints cross both ways)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import smoke_config
from scio_support import saved_tables
from klip import checkpoint as checkpoint_lib
from klip import distributed
from klip import faults
from klip import sharding
from klip import train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_SITE = os.path.join(ROOT, "tests", "jax_site")
MESH_AXES = sharding.MESH_AXES


# ---------------------------------------------------------------------------------------------
# Plans: how a process joins, from flags or the environment.
# ---------------------------------------------------------------------------------------------
def test_plan_explicit_flags():
  p = distributed.plan("10.0.0.1:1234", 4, 3, env={}, cloud_tpu=False)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == (
      "explicit", "10.0.0.1:1234", 4, 3)
  assert "process 3 of 4" in p.describe()


@pytest.mark.parametrize("args, match", [
    (("h:1", 2, None), "--coordinator_address, --num_processes given without --process_id"),
    ((None, 2, 0), "without --coordinator_address"),
    (("h:1", 2, 2), r"process_id 2 is outside \[0, 2\) for num_processes 2"),
    (("h:1", 0, 0), "num_processes must be at least 1, got 0"),
])
def test_plan_bad_flags_name_the_numbers(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan(*args, env={}, cloud_tpu=False)


def test_plan_single_process_and_tpu():
  assert distributed.plan(env={}, cloud_tpu=False).mode == "single"
  assert distributed.plan(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"},
                          cloud_tpu=False).mode == "single"
  assert distributed.plan(env={}, cloud_tpu=True).mode == "tpu"


def test_plan_slurm_one_process_per_gpu():
  env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_PROCID": "9",
         "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[007-008]"}
  p = distributed.plan(env=env, cloud_tpu=False)
  assert (p.mode, p.num_processes, p.process_id, p.local_device_ids) == ("slurm", 16, 9, (1,))
  assert p.coordinator_address == f"gpu007:{61440 + 4242 % 4096}"
  # the sbatch script's coordinator wins; one task per node keeps all of the node's devices
  env.update(KLIP_COORDINATOR_ADDRESS="gpu007:29500", SLURM_NTASKS="2", SLURM_PROCID="1")
  p = distributed.plan(env=env, cloud_tpu=False)
  assert (p.coordinator_address, p.local_device_ids) == ("gpu007:29500", None)
  # explicit flags win over SLURM
  assert distributed.plan("h:1", 2, 0, env=env, cloud_tpu=False).mode == "explicit"


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("a1,b2", "a1"), ("gpu[003-005,9],cpu1", "gpu003"),
    ("x[12,14]", "x12"), ("rack-1-n[07-09]", "rack-1-n07")])
def test_first_host_of_slurm_nodelists(nodelist, host):
  assert distributed.first_host(nodelist) == host


# ---------------------------------------------------------------------------------------------
# Meshes for many device counts and axis settings.
# ---------------------------------------------------------------------------------------------
def _mesh(**axes):
  return {**dict(slice=1, data=-1, fsdp=1, tensor=1), **axes}


@pytest.mark.parametrize("devices, axes, shape", [
    (1, {}, (1, 1, 1, 1)),
    (8, {}, (1, 8, 1, 1)),
    (8, dict(fsdp=2, tensor=2), (1, 2, 2, 2)),
    (8, dict(data=1, fsdp=-1), (1, 1, 8, 1)),
    (16, dict(slice=2, tensor=4), (2, 2, 1, 4)),
    (256, dict(slice=4, fsdp=16), (4, 4, 16, 1)),
    (512, dict(data=8, fsdp=-1, tensor=4), (1, 8, 16, 4)),
    (6, dict(tensor=3), (1, 2, 1, 3)),
])
def test_mesh_shapes(devices, axes, shape):
  assert sharding.mesh_shape(_mesh(**axes), devices) == shape


@pytest.mark.parametrize("devices, axes, match", [
    (8, dict(tensor=3), r"mesh .*'tensor': 3.* does not divide 8 devices"),
    (6, dict(data=4), r"mesh .*'data': 4.* does not divide 6 devices"),
    (8, dict(data=2, fsdp=2), r"has 4 devices, but 8 are available"),
    (8, dict(data=-1, fsdp=-1), "at most one axis may be -1"),
])
def test_mesh_errors_name_the_numbers(devices, axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(_mesh(**axes), devices)


@pytest.mark.parametrize("devices, processes, axes, match", [
    (8, 4, dict(data=1, tensor=-1), r"splits the batch into 1 shards, which do not divide over "
                                    r"4 processes"),
    (12, 8, {}, "12 devices do not divide over 8 processes"),
    (8, 3, {}, "8 devices do not divide over 3 processes"),
])
def test_layout_errors_name_the_numbers(devices, processes, axes, match):
  with pytest.raises(ValueError, match=match):
    distributed.check_layout(_mesh(**axes), devices, processes)


def test_layout_accepts_batch_shards_per_process():
  assert distributed.check_layout(_mesh(fsdp=2, tensor=2), 16, 4) == dict(
      slice=1, data=4, fsdp=2, tensor=2)


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_multislice_mesh_puts_slices_on_the_first_axis():
  # Fake devices of two 4-chip slices (the TPU runtime reports `slice_index`).
  devices = [_FakeDevice(i, slice_index=i // 4, process_index=i // 4) for i in range(8)]
  mesh = sharding.make_mesh(_mesh(slice=2, fsdp=2), devices)
  assert dict(mesh.shape) == dict(slice=2, data=2, fsdp=2, tensor=1)
  for s in range(2):
    assert {d.slice_index for d in mesh.devices[s].flat} == {s}


# ---------------------------------------------------------------------------------------------
# Two processes x two CPU devices against one process x four.
# ---------------------------------------------------------------------------------------------
def _env():
  # tests/jax_site/sitecustomize.py: every process of a run writes the persistent compilation
  # cache, so that process 1 of a later launch finds its programs as process 0 does.
  path = os.pathsep.join(filter(None, [JAX_SITE, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="", JAX_PLATFORMS="cpu",
              PYTHONPATH=path)


def _train_args(workdir, data_dir, *overrides):
  return ["--config=configs/pretrain.py:smoke", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--distributed_timeout_s=120",
          "--heartbeat_timeout_s=30", *overrides]


def _one_process(workdir, data_dir, *overrides):
  out = subprocess.run([sys.executable, "-m", "klip.train", "--num_cpu_devices=4",
                        *_train_args(workdir, data_dir, *overrides)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _two_processes(workdir, data_dir, log_dir, *overrides, fault=None):
  """Runs launch/local.sh with 2 processes x 2 CPU devices; returns the processes' logs. With
  a `fault` (klip/faults.py) planted in both, the launcher must report that it gave up."""
  env = _env()
  if fault:
    env[faults.ENV] = fault
  out = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), "--num_processes=2",
                        "--devices_per_process=2", f"--log_dir={log_dir}",
                        f"--python={sys.executable}", "--",
                        *_train_args(workdir, data_dir, *overrides)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  logs = []
  for i in range(2):
    with open(os.path.join(log_dir, f"process_{i}.log")) as f:
      logs.append(f.read())
  expected = 1 if fault else 0
  assert out.returncode == expected, out.stderr + "\n".join(log[-3000:] for log in logs)
  return logs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _restore(workdir, step, config, dims, devices):
  """The train state of `step`, restored in this process onto a mesh over `devices`."""
  mesh = sharding.make_mesh(dict(slice=1, **dims), devices)
  _, state, shardings = train_state.create(config, mesh, config.sharding_rules)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
  state, data = ckpt.restore(step, state, shardings)
  ckpt.close()
  assert {d for x in jax.tree.leaves(state) for d in x.sharding.device_set} <= set(devices)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state)), data


def _assert_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """Three smoke runs: 1 process x 4 CPU devices ("one", checkpoints at steps 5 and 10),
  2 processes x 2 devices from scratch ("two"), and 2 x 2 resuming "one"'s step 5 on an fsdp=2
  mesh ("resumed"). Returns their workdirs and the 2-process runs' logs."""
  root = tmp_path_factory.mktemp("runs")
  one, two, resumed = (str(root / name) for name in ("one", "two", "resumed"))
  stdout = _one_process(one, data_dir)
  assert "over 4 devices, 1 process(es)" in stdout
  os.makedirs(two)
  shutil.copy(os.path.join(one, "tokenizer.model"), two)
  shutil.copytree(one, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "10"))
  # One after the other: gloo gives processes 30 s to meet at a collective, which 4 compiling
  # processes on 2 loaded cores can miss.
  logs = {"two": _two_processes(two, data_dir, str(root / "two_logs")),
          "resumed": _two_processes(resumed, data_dir, str(root / "resumed_logs"),
                                    "--config.mesh.fsdp=2")}
  return {"one": one, "two": two, "resumed": resumed, "logs": logs}


@pytest.mark.slow
def test_two_processes_equal_one_and_checkpoint_restores_in_one(runs, data_dir):
  logs = runs["logs"]["two"]
  assert "over 4 devices, 2 process(es)" in logs[0]
  assert "joined as process 1 of 2, 2 local of 4 devices" in logs[1]
  assert "step 10/10" in logs[0] and "step 10/10" not in logs[1]  # process 0 logs alone
  want, got = _losses(runs["one"]), _losses(runs["two"])
  assert list(got) == list(range(1, 11))
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  # the 2-process checkpoint restores in this one process on other meshes, equal to the
  # 1-process run's parameters
  config = smoke_config(data_dir)
  ref, _ = _restore(runs["one"], 10, config, dict(data=4, fsdp=1, tensor=1), jax.devices()[:4])
  for dims, devices in ((dict(data=1, fsdp=2, tensor=2), jax.devices()[4:]),
                        (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
    state, data = _restore(runs["two"], 10, config, dims, devices)
    assert data["step"] == 10 and data["examples_seen"] == 80
    _assert_close(state["model"], ref["model"], rtol=1e-5)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_on_another_mesh(runs, data_dir):
  logs = runs["logs"]["resumed"]
  assert "resumed from step 5" in logs[0] and "resumed from step 5" in logs[1]
  assert "mesh {'slice': 1, 'data': 2, 'fsdp': 2, 'tensor': 1}" in logs[0]
  want, got = _losses(runs["one"]), _losses(runs["resumed"])
  np.testing.assert_allclose([got[s] for s in range(6, 11)], [want[s] for s in range(6, 11)],
                             rtol=1e-4)
  config = smoke_config(data_dir)
  dims = dict(data=4, fsdp=1, tensor=1)
  resumed, _ = _restore(runs["resumed"], 10, config, dims, jax.devices()[:4])
  ref, _ = _restore(runs["one"], 10, config, dims, jax.devices()[:4])
  _assert_close(resumed["model"], ref["model"], rtol=1e-4)


@pytest.mark.slow
def test_scio_in_two_processes_equals_one(data_dir, tmp_path):
  """SCIO on (passes at steps 6 and 9: proofread, then reconstruct with the value pool's
  candidates): 2 processes x 2 devices rescore their shares of each chunk and reach the same
  pair tables and parameters as 1 process x 4 devices, and a 2-process run killed inside a
  pass resumes to the uninterrupted one's."""
  scio = ("--config.scio.enabled=True", "--config.scio.every_steps=3",
          "--config.scio.fill_candidates=4")
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _one_process(one, data_dir, *scio)
  os.makedirs(two)
  shutil.copy(os.path.join(one, "tokenizer.model"), two)
  logs = _two_processes(two, data_dir, str(tmp_path / "logs"), *scio)
  assert "SCIO pass at step 9 (stage 2" in logs[0] and "SCIO pass" not in logs[1]
  rows = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
  passes = [r for r in rows if "scio/pass_seconds" in r]
  assert [r["step"] for r in passes] == [6, 9]
  assert all(r["scio/rescored"] == 64 and r["scio/skipped_malformed"] == 0 for r in passes)
  want, got = saved_tables(one, 10), saved_tables(two, 10)
  for name in ("active", "pending"):
    a, b = want[name], got[name]
    if a is None:
      assert b is None
      continue
    assert a["version"] == b["version"] and a["dropped"] == b["dropped"]
    assert a["rewrites"] == b["rewrites"] and a["scored_version"] == b["scored_version"]
    np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["weight"], a["weight"], rtol=1e-4, atol=1e-5)
  assert want["pending"] is not None or want["active"]["version"] >= 1
  np.testing.assert_allclose([r["loss"] for r in rows],
                             list(_losses(one).values()), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(checkpoint_lib.read_params(two)),
                  jax.tree.leaves(checkpoint_lib.read_params(one))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
  # Both processes SIGKILLed inside the pass of step 9 (after its first chunk); the same
  # command resumes from step 5 and ends where the uninterrupted 2-process run ended.
  killed = str(tmp_path / "killed")
  os.makedirs(killed)
  shutil.copy(os.path.join(one, "tokenizer.model"), killed)
  _two_processes(killed, data_dir, str(tmp_path / "killed_logs"), *scio,
                 fault="kill_in_pass_at_step=9")
  logs = _two_processes(killed, data_dir, str(tmp_path / "resumed_logs"), *scio)
  assert "resumed from step 5" in logs[0] and "resumed from step 5" in logs[1]
  assert saved_tables(killed, 10) == saved_tables(two, 10)
  for x, y in zip(jax.tree.leaves(checkpoint_lib.read_params(killed)),
                  jax.tree.leaves(checkpoint_lib.read_params(two))):
    np.testing.assert_array_equal(x, y)
  assert _losses(killed) == _losses(two)


EVALS = "zeroshot_category,probe_category,retrieval,captioning,vqa"


def _eval_args(workdir, data_dir):
  return ["-m", "evals.run", "--config=configs/eval.py:smoke", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", "--config.source_root=/nonexistent", "--once",
          "--step=10", f"--only={EVALS}", "--distributed_timeout_s=120",
          "--heartbeat_timeout_s=30"]


def _eval_metrics(workdir):
  with open(os.path.join(workdir, "eval", "metrics.jsonl")) as f:
    return json.loads(f.readlines()[-1])


@pytest.mark.slow
def test_the_eval_job_in_two_processes_equals_one(runs, data_dir, tmp_path):
  """evals.run over 2 processes x 2 CPU devices (each computes its share of every batch,
  process 0 writes) gives the metrics of 1 process x 4 devices on the same checkpoint."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  for w in (one, two):
    shutil.copytree(runs["one"], w, ignore=shutil.ignore_patterns("eval"))
  out = subprocess.run([sys.executable, *_eval_args(one, data_dir),
                        "--num_cpu_devices=4"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, *_eval_args(two, data_dir),
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}", "--num_cpu_devices=2"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  assert "joined as process 1 of 2" in logs[1]
  want, got = _eval_metrics(one), _eval_metrics(two)
  assert not got["failed"] and not got["skipped"], (got["failed"], got["skipped"])
  assert sorted(got["metrics"]) == sorted(want["metrics"]) and len(got["metrics"]) > 20
  for name, value in want["metrics"].items():
    np.testing.assert_allclose(got["metrics"][name], value, rtol=1e-3, atol=1e-4, err_msg=name)
  assert os.path.exists(os.path.join(two, "eval", "report.md"))


@pytest.mark.slow
def test_a_missing_worker_fails_fast_with_a_message(tmp_path, data_dir):
  # Process 0 of 2 starts alone: it gives up after the join timeout instead of hanging.
  out = subprocess.run([sys.executable, "-m", "klip.train", "--coordinator_address=127.0.0.1:"
                        f"{_free_port()}", "--num_processes=2", "--process_id=0",
                        "--num_cpu_devices=2",
                        *_train_args(str(tmp_path / "w"), data_dir),
                        "--distributed_timeout_s=3"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "explicit: process 0 of 2" in out.stdout and "waiting up to 3 s" in out.stdout
  assert "DEADLINE_EXCEEDED" in out.stderr


def _free_port():
  import portpicker  # pylint: disable=g-import-not-at-top
  return portpicker.pick_unused_port()
