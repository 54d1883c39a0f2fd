"""Launch scripts: every dry run prints a complete command sequence; shellcheck is clean."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("local.sh", "supervise.sh", "slurm.sh", "slurm.sbatch", "tpu_vm.sh")


def _run(*args, env=None, check=True):
  out = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, **(env or {})))
  if check:
    assert out.returncode == 0, out.stderr
  return out


def _tpu(command, *options):
  return _run(os.path.join(LAUNCH, "tpu_vm.sh"), command, "--name=klip-base",
              "--zone=us-west4-a", "--project=my-proj", "--dry_run", *options).stdout


def _no_gcloud_path(tmp_path):
  """A PATH with the tools the scripts use, and no gcloud."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("sed", "dirname", "bash", "tail", "sleep"):
    for d in os.environ["PATH"].split(os.pathsep):
      if os.path.exists(os.path.join(d, tool)):
        os.symlink(os.path.join(d, tool), bin_dir / tool)
        break
  return str(bin_dir)


def test_shellcheck_is_clean():
  out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "shellcheck"),
                        *[os.path.join(LAUNCH, s) for s in SCRIPTS]],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_tpu_up_creates_syncs_sets_up_and_runs_on_all_workers():
  out = _tpu("up", "--bucket=gs://my-klip", "--", "--config.data.data_dir=/mnt/klip/data")
  lines = out.splitlines()
  create = next(i for i, l in enumerate(lines) if "tpu-vm create klip-base" in l)
  assert "--accelerator-type=v5litepod-16" in lines[create] and "--project=my-proj" in out
  order = ["tpu-vm create", "tar -czf", "tpu-vm scp", "tar -xzf", "pip install",
           "gcsfuse --implicit-dirs --only-dir=data my-klip /mnt/klip/data", "klip.train"]
  positions = [next(i for i, l in enumerate(lines) if key in l) for key in order]
  assert positions == sorted(positions), positions
  run = lines[positions[-1]]
  assert "--worker=all" in run and "launch/supervise.sh" in run
  assert "--workdir=gs://my-klip/workdirs/klip-base" in run  # on GCS itself, not the mount
  assert "--config.data.data_dir=/mnt/klip/data" in run
  assert "train-$(hostname).log" in run  # one log per worker
  assert "'jax[tpu]==" in out


def test_tpu_spot_uses_a_queued_resource_and_waits_for_it():
  out = _tpu("create", "--spot")
  assert "queued-resources create klip-base" in out and "--spot" in out
  assert "--node-id=klip-base" in out
  assert "queued-resources describe klip-base" in out and "ACTIVE" in out


def test_tpu_multislice_creates_slices_and_runs_on_every_node():
  out = _tpu("up", "--num_slices=2", "--accelerator_type=v5litepod-256")
  assert "--node-count=2 --node-prefix=klip-base" in out
  assert "tpu-vm scp /tmp/klip-klip-base.tgz klip-base-0:klip.tgz" in out
  assert "tpu-vm scp /tmp/klip-klip-base.tgz klip-base-1:klip.tgz" in out
  run = next(l for l in out.splitlines() if "klip.train" in l)
  assert "queued-resources ssh klip-base" in run and "--node=all --worker=all" in run
  assert "--config.mesh.slice=2" in run


@pytest.mark.parametrize("command, expected", [
    ("logs", ["--worker=all", "tail -n 100", "klip-logs/train-*.log"]),
    ("status", ["tpu-vm describe klip-base", "training", "--worker=all"]),
    ("stop", ["--worker=all", "kill -TERM", "supervise.pid"]),
    ("delete", ["tpu-vm delete klip-base", "--quiet"]),
])
def test_tpu_day_two_commands(command, expected):
  out = _tpu(command)
  for e in expected:
    assert e in out, (e, out)


def test_tpu_follow_logs_and_queued_delete():
  assert "tail -F" in _tpu("logs", "--follow")
  assert "queued-resources delete klip-base" in _tpu("delete", "--spot")


def test_tpu_keepalive_recreates_a_preempted_tpu_and_resumes():
  out = _tpu("keepalive", "--spot")
  for key in ("queued-resources describe", "queued-resources delete", "queued-resources create",
              "tpu-vm scp", "pip install", "klip.train", "KLIP run finished", "sleep 300"):
    assert key in out, key


def test_tpu_without_gcloud_says_so_and_the_dry_run_still_prints(tmp_path):
  env = {"PATH": _no_gcloud_path(tmp_path)}
  script = os.path.join(LAUNCH, "tpu_vm.sh")
  out = _run(script, "up", "--name=x", "--dry_run", env=env)
  assert "gcloud is not installed" in out.stderr and "tpu-vm create x" in out.stdout
  out = _run(script, "up", "--name=x", env=env, check=False)
  assert out.returncode == 1 and "gcloud is not installed" in out.stderr
  assert "tpu-vm create" not in out.stdout


def test_tpu_bad_usage():
  out = _run(os.path.join(LAUNCH, "tpu_vm.sh"), "up", "--dry_run", env={"TPU_NAME": ""},
             check=False)
  assert out.returncode == 2 and "--name" in out.stderr
  out = _run(os.path.join(LAUNCH, "tpu_vm.sh"), "launch", "--name=x", "--dry_run", check=False)
  assert out.returncode == 2 and "unknown command launch" in out.stderr


def test_slurm_wrapper_dry_runs():
  script = os.path.join(LAUNCH, "slurm.sh")
  out = _run(script, "submit", "--nodes=4", "--gpus_per_node=8", "--dry_run", "--",
             "--config=configs/pretrain.py:base", "--workdir=/shared/w").stdout
  assert ("sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --time=24:00:00 "
          "launch/slurm.sbatch --config=configs/pretrain.py:base --workdir=/shared/w") in out
  expected = {"logs": "tail -n 100 ", "status": "squeue --job=77",
              "stop": "scancel --signal=TERM 77", "cancel": "scancel 77"}
  for command, line in expected.items():
    assert line in _run(script, command, "--job=77", "--dry_run").stdout
  out = _run(script, "stop", "--dry_run", check=False)
  assert out.returncode == 2 and "--job=JOBID" in out.stderr


def test_slurm_batch_script_starts_one_process_per_gpu_with_the_coordinator(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/bin/sh\necho gpu007\necho gpu008\n")
  (bin_dir / "scontrol").chmod(0o755)
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "16", "KLIP_DRY_RUN": "1",
         "SLURM_SUBMIT_DIR": str(tmp_path)}
  out = _run(os.path.join(LAUNCH, "slurm.sbatch"), "--config=configs/pretrain.py:base",
             env=env).stdout
  assert f"coordinator gpu007:{61440 + 4242 % 4096}" in out
  assert "srun --kill-on-bad-exit=1" in out
  assert "-m klip.train --config=configs/pretrain.py:base" in out
  assert "scontrol requeue 4242" in out
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    header = f.read()
  for directive in ("--requeue", "--signal=B:TERM@", "--gpus-per-node=8", "--ntasks-per-node=8"):
    assert f"#SBATCH {directive}" in header


def test_local_dry_run_starts_every_process():
  out = _run(os.path.join(LAUNCH, "local.sh"), "--num_processes=3", "--devices_per_process=2",
             "--log_dir=logs/x", "--dry_run", "--", "--config=configs/pretrain.py:smoke").stdout
  for i in range(3):
    assert (f"--num_processes=3 --process_id={i} --num_cpu_devices=2 "
            "--config=configs/pretrain.py:smoke > logs/x/process_" + f"{i}.log") in out
  assert "XLA_FLAGS=" in out and "--coordinator_address=127.0.0.1:" in out


@pytest.mark.parametrize("given, passed", [
    ("", "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the caller's choice is kept
])
def test_local_passes_glibc_huge_pages(given, passed):
  out = _run(os.path.join(LAUNCH, "local.sh"), "--num_processes=2", "--dry_run", "--",
             "--config=x", env={"GLIBC_TUNABLES": given}).stdout
  assert out.count(f" GLIBC_TUNABLES={passed} ") == 2, out


def test_local_stops_the_others_when_one_fails_and_restarts(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text("#!/usr/bin/env bash\n"  # process 1 fails; process 0 would run for long
                  'for a in "$@"; do [[ "$a" == --process_id=1 ]] && exit 7; done\n'
                  "exec sleep 60\n")
  fake.chmod(0o755)
  out = _run(os.path.join(LAUNCH, "local.sh"), f"--python={fake}", "--max_restarts=1", "--port=1",
             f"--log_dir={tmp_path / 'logs'}", "--", "--config=x", check=False)
  assert out.returncode == 1
  assert out.stderr.count("process 1 exited with status 7 (log") == 2, out.stderr
  assert "restart 1 of 1" in out.stderr and "giving up" in out.stderr


def test_local_sees_processes_killed_together(tmp_path):
  """Every process SIGKILLed at once (a fault, the OOM killer): bash forgets a signalled job once
  it has reported it, so `wait -n` alone would spin on "no such job"; the launcher still reads
  each status, restarts, and gives up."""
  fake = tmp_path / "fake_python"
  fake.write_text("#!/usr/bin/env bash\nsleep 0.2\nkill -KILL $$\n")
  fake.chmod(0o755)
  out = _run(os.path.join(LAUNCH, "local.sh"), f"--python={fake}", "--num_processes=3",
             "--max_restarts=4", "--port=1", f"--log_dir={tmp_path / 'logs'}", "--",
             "--config=x", check=False)
  assert out.returncode == 1, out.stderr
  assert out.stderr.count("exited with status 137 (log") == 5, out.stderr
  assert "restart 4 of 4" in out.stderr and "no such job" not in out.stderr


def test_supervise_restarts_a_failed_command_and_passes_sigterm(tmp_path):
  marker = tmp_path / "failed_once"
  script = os.path.join(LAUNCH, "supervise.sh")
  out = _run(script, "--max_restarts=2", "--restart_delay_s=0", "--", "bash", "-c",
             f"[ -f {marker} ] && echo resumed || {{ touch {marker}; exit 3; }}")
  assert "resumed" in out.stdout and "exit status 3; restart 1 of 2" in out.stderr
  out = _run(script, "--max_restarts=1", "--restart_delay_s=0", "--", "false", check=False)
  assert out.returncode == 1 and "giving up" in out.stderr
  proc = subprocess.Popen(["bash", script, f"--pid_file={tmp_path / 'pid'}", "--", "bash", "-c",
                           "trap 'echo saved; kill $!; exit 0' TERM; echo ready; sleep 60 & wait"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "ready\n"  # the command has set its trap
  proc.terminate()
  stdout, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0 and "saved" in stdout and "restart" not in stderr
