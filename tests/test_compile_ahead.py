"""klip.compile_ahead: the train step compiled for a mesh or a TPU topology without running it,
and the search for the largest per-chip batch that fits a chip's HBM."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from conftest import smoke_config
from klip import compile_ahead

GIB = compile_ahead.GIB
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_ahead_reports_per_device_memory(data_dir):
  config = smoke_config(data_dir, **{"mesh.fsdp": 2})
  mesh, compiled = compile_ahead.compile_step(config, jax.devices()[:2])
  assert dict(mesh.shape) == dict(slice=1, data=1, fsdp=2, tensor=1)
  report = compile_ahead.memory_report(compiled, peak=False)
  assert report["arguments"] > 0 and report["temporaries"] > 0
  assert report["aliased"] > 0  # the donated train state
  assert report["total"] == (report["arguments"] + report["outputs"] - report["aliased"] +
                             report["temporaries"])


def test_batch_specs_carry_every_input_the_objectives_read(data_dir):
  """Clause-swap negatives and clause rivals are in the compiled batch as the trainer feeds
  them (the step once failed to compile with `loss.clause_negatives`: no swap_tokens)."""
  config = smoke_config(data_dir, **{"loss.clause_negatives": True, "loss.clause_rivals": 3})
  mesh, _ = compile_ahead.compile_step(config, jax.devices()[:2])
  specs = compile_ahead.batch_specs(config, mesh, config.sharding_rules)
  b, m = config.batch_size, config.model
  assert specs["swap_tokens"].shape == (b, m.text.max_len) and specs["has_swap"].shape == (b,)
  assert specs["rival_tokens"].shape == (b, 3, config.loss.clause_max_len)
  assert specs["has_rival"].shape == (b, 3)


@pytest.mark.parametrize("name, n", [("v5e:2x2", 4), ("v4:2x2x1", 4), ("v5e:16x16", 256)])
def test_compile_ahead_topology_chip_counts(name, n):
  assert compile_ahead.chips(name) == n


def test_compile_ahead_bad_topology_name():
  with pytest.raises(ValueError, match="topology 'v5e-4' is not of the form v5e:2x2"):
    compile_ahead.chips("v5e-4")


# ---------------------------------------------------------------------------------------------
# The fit search, against a memory model standing in for the TPU compiler: bytes per device =
# state + a batch-independent part of the temporaries + bytes per example x per-chip batch,
# and the compiler fails above HBM.
# ---------------------------------------------------------------------------------------------
STATE, CONSTANT = 2.5 * GIB, 1.0 * GIB
PER_EXAMPLE = {"dots_saveable": 0.4 * GIB, "full": 0.1 * GIB}


def _fake_compiles(monkeypatch, compiled):
  def fake(config, devices, policy, per_chip, hbm, log=print):
    del config, devices, log
    compiled.append((policy, per_chip))
    temporaries = CONSTANT + PER_EXAMPLE[policy] * per_chip
    used = STATE + temporaries
    return compile_ahead.Trial(policy, per_chip, used if used <= hbm else None,
                               int(temporaries))
  monkeypatch.setattr(compile_ahead, "compile_trial", fake)


def _largest_fitting(policy, hbm, start):
  b = start
  while STATE + CONSTANT + PER_EXAMPLE[policy] * 2 * b <= hbm:
    b *= 2
  while STATE + CONSTANT + PER_EXAMPLE[policy] * b > hbm and b > 1:
    b //= 2
  return b


@pytest.mark.parametrize("hbm_gib", [15.75, 30.75, 95.74])
def test_fit_search_finds_the_largest_batch_with_few_compiles(data_dir, monkeypatch, hbm_gib):
  config = smoke_config(data_dir)  # batch 8 on one device: the search starts at per-chip 8
  compiled = []
  _fake_compiles(monkeypatch, compiled)
  trials, predicted = compile_ahead.fit_search(config, jax.devices()[:1], hbm_gib,
                                               ["dots_saveable", "full"], log=lambda m: None)
  best = compile_ahead.best_per_policy(trials)
  hbm = hbm_gib * GIB
  want_dots = _largest_fitting("dots_saveable", hbm, 8)
  assert best["dots_saveable"].per_chip == want_dots
  assert best["full"].per_chip == _largest_fitting("full", hbm, want_dots)
  for policy in ("dots_saveable", "full"):
    assert sum(p == policy for p, _ in compiled) <= 4, compiled
    b = best[policy].per_chip
    # the next doubling either compiled and failed, or was predicted (correctly) not to fit
    if (policy, 2 * b) in compiled:
      assert not [t for t in trials if t.policy == policy and t.per_chip == 2 * b][0].fits
    elif 2 * b > 512:  # fit_search's default cap
      assert policy not in predicted
    else:
      nxt, predicted_bytes = predicted[policy]
      assert nxt == 2 * b and predicted_bytes > hbm
      assert STATE + CONSTANT + PER_EXAMPLE[policy] * nxt > hbm


def test_fit_search_stops_at_the_cap(data_dir, monkeypatch):
  config = smoke_config(data_dir)
  compiled = []
  _fake_compiles(monkeypatch, compiled)
  trials, predicted = compile_ahead.fit_search(config, jax.devices()[:1], 95.74, ["full"],
                                               max_per_chip=32, log=lambda m: None)
  assert compile_ahead.best_per_policy(trials)["full"].per_chip == 32
  assert max(b for _, b in compiled) == 32 and "full" not in predicted


def test_fit_search_halves_a_start_that_does_not_fit(data_dir, monkeypatch):
  config = smoke_config(data_dir, batch_size=64)
  compiled = []
  _fake_compiles(monkeypatch, compiled)
  trials, _ = compile_ahead.fit_search(config, jax.devices()[:1], 15.75, ["dots_saveable"],
                                       log=lambda m: None)
  assert compiled[0] == ("dots_saveable", 64) and not trials[0].fits
  assert compile_ahead.best_per_policy(trials)["dots_saveable"].per_chip == 16  # 14.4 GiB


def test_fit_search_reuses_the_callers_first_compile(data_dir, monkeypatch):
  config = smoke_config(data_dir)
  compiled = []
  _fake_compiles(monkeypatch, compiled)
  first = compile_ahead.Trial("dots_saveable", 8, int(STATE + CONSTANT + 3.2 * GIB),
                              int(CONSTANT + 3.2 * GIB))
  trials, _ = compile_ahead.fit_search(config, jax.devices()[:1], 15.75, ["dots_saveable"],
                                       first=first, log=lambda m: None)
  assert trials[0] is first and ("dots_saveable", 8) not in compiled


# ---------------------------------------------------------------------------------------------
# The TPU compiler itself (libtpu: requirements-tpu.txt), on a small topology.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -r "
                    "requirements-tpu.txt; make venv-tpu): no TPU compiler to compile for")
def test_tpu_topology_compile_prints_verdict_and_fit(data_dir, tmp_path):
  env = dict(os.environ, TPU_WORKER_HOSTNAMES="localhost", TPU_LOG_DIR=str(tmp_path / "logs"))
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "-m", "klip.compile_ahead", "--config=configs/pretrain.py:smoke",
       "--topology=v5e:2x2", "--fit_policies=full", "--fit_max_per_chip=8",
       f"--config.data.data_dir={data_dir}"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "TPU topology v5e:2x2 x 1 slice(s) (TPU v5 lite)" in text, text
  assert "HBM per chip 15.75 GiB: fits" in text, text
  assert "largest per-chip batch that fits with remat 'full': 8 (global 32" in text, text
