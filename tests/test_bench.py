"""Quick checks of the benchmark machinery (no timings: benchmarks never run in tests).

The analytic FLOP counter (bench/flops.py) must describe what XLA compiles: on the `smoke`
config its count of the train step's matmul FLOPs agrees with the dots of the compiled step.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import common
from bench import flops
from bench import gpu_profile
from bench import gpu_step
from bench import scaling
from klip.data import caption as caption_lib
from tests.conftest import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hlo_counter_weights_loops_by_trip_count():
  w = jnp.ones((32, 32))

  def f(x):
    y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
    return jnp.sum(jnp.tanh(y @ w))

  compiled = jax.jit(jax.grad(f)).lower(jnp.ones((8, 32))).compile()
  counted = flops.compiled_flops(compiled)["matmul"]
  # forward: 6 dots (5 in the loop); backward: one input-gradient dot each (w is constant)
  assert counted == 12 * 2 * 8 * 32 * 32


def test_hlo_counter_convolution():
  def f(x, k):
    return jax.lax.conv_general_dilated(x, k, (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  compiled = jax.jit(f).lower(jnp.ones((2, 16, 16, 3)), jnp.ones((4, 4, 3, 8))).compile()
  assert flops.compiled_flops(compiled)["matmul"] == 2 * (2 * 4 * 4 * 8) * (4 * 4 * 3)


@pytest.mark.parametrize("objectives", ["full", "full_top_fusion", "contrast"])
def test_analytic_flops_match_xla_on_smoke(data_dir, objectives):
  overrides = {"full": {}, "full_top_fusion": {"model.text.fusion_layers": 1,
                                                "model.decoder.depth": 1,
                                                "loss.clause_negatives": True,
                                                "loss.clause_rivals": 3},
               "contrast": {"loss.match_weight": 0.0, "loss.reconstruct_weight": 0.0,
                            "loss.clause_contrast_weight": 0.0,
                            "model.text.fusion_layers": 0, "model.decoder.depth": 0}}[objectives]
  config = smoke_config(data_dir, **overrides)
  step = common.ProjectStep(config, devices=jax.devices()[:1])
  step.compile()
  counted = flops.compiled_flops(step.compiled)["matmul"]
  count = (flops.full_step(config) if objectives.startswith("full")
           else flops.contrast_step(config.model, config.batch_size))
  assert counted == pytest.approx(count.train_total, rel=0.02)


@pytest.mark.parametrize("fusion_layers,variants,length", [(2, 9, 64), (1, 46, 48)])
def test_analytic_scio_scoring_flops_match_xla(data_dir, fusion_layers, variants, length):
  """flops.scio_scores against the compiled scoring function of SCIO and the evaluators, with
  all blocks fused or the top one only; the first fusion block's self-attention, the same as
  the contrastive pass's, is compiled once and counted once."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from klip import inference  # pylint: disable=g-import-not-at-top
  from klip.model.two_tower import Model  # pylint: disable=g-import-not-at-top
  m = smoke_config(data_dir, **{"model.text.fusion_layers": fusion_layers}).model
  model = nnx.jit(lambda: Model(m, rngs=nnx.Rngs(0)))()
  images = np.zeros((4, m.image_size, m.image_size, m.channels), np.float32)
  texts = np.ones((4, variants, length), np.int32)
  compiled = nnx.jit(inference.variant_scores).lower(model, images, texts).compile()
  assert flops.compiled_flops(compiled)["matmul"] == flops.scio_scores(
      m, 4, variants, length=length).forward_total


def test_scaling_arithmetic_follows_flops_peak_and_mfu():
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  rows = scaling.rows()
  assert {(r["variant"], r["slice"], r["mfu"]) for r in rows} == {
      (v, s, m) for v in ("base", "large") for s in ("v5e-256", "v5p-1024")
      for m in scaling.ASSUMED_MFU}
  for r in rows:
    config = pretrain.get_config(r["variant"])
    step_flops = flops.full_step(config, batch=r["batch"]).train_total
    chip = "v5e" if r["slice"] == "v5e-256" else "v5p"
    want = step_flops / (r["chips"] * scaling.PEAK_TFLOPS[chip] * 1e12 * r["mfu"])
    np.testing.assert_allclose(r["step_s"], want, rtol=1e-9)
    np.testing.assert_allclose(r["hours"][100_000_000], 100 * r["hours"][1_000_000])
  doubled = scaling.rows(per_chip_batch=16)
  assert all(d["batch"] == 16 * d["chips"] for d in doubled)


def test_gpu_step_imports_no_data_stack():
  """The GPU host has no grain/tfds/sentencepiece: the step's import chain must not need them."""
  code = ("from bench import gpu_step; gpu_step.install_guard()\n"
          "from bench import common, flops, gpu_profile\n"
          "from klip import train_state, train_step\n"
          "try:\n  import grain\nexcept ImportError as e:\n  print('blocked', e)\n")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  assert "blocked" in out.stdout
  assert "sentencepiece" not in out.stderr


def test_gpu_kernel_kinds():
  """Kernel names as an H200 trace of base's step showed them."""
  assert gpu_profile.kernel_kind("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "gemm"
  assert gpu_profile.kernel_kind("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_t") == "gemm"
  assert gpu_profile.kernel_kind("gemm_fusion_dot_250") == "gemm"
  assert gpu_profile.kernel_kind("memcpy128") == "copy"
  assert gpu_profile.kernel_kind(
      "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1"
      "_kernel0") == "cudnn attention"
  assert gpu_profile.kernel_kind("void cudnn::fusion::convert_dq_to_16bits<true>(void const*)"
                                 ) == "cudnn attention"
  assert gpu_profile.kernel_kind("input_reduce_fusion_12") == "input_reduce_fusion"
  assert gpu_profile.kernel_kind("loop_add_fusion.3") == "loop_add_fusion"


def test_gpu_kernel_table_refuses_a_trace_without_a_gpu(tmp_path):
  path = gpu_profile.capture(lambda: jax.block_until_ready(jnp.ones(8) * 2), str(tmp_path))
  assert os.path.getsize(path) > 0
  with pytest.raises(ValueError, match="no GPU device plane"):
    gpu_profile.kernel_table(path, steps=1)


def test_gpu_step_set_overrides():
  assert gpu_step.parse_set("model.remat_policy=none") == ("model.remat_policy", "none")
  assert gpu_step.parse_set("loss.match_weight=0.0") == ("loss.match_weight", 0.0)
  assert gpu_step.parse_set("model.scan_layers=False") == ("model.scan_layers", False)
  with pytest.raises(Exception, match="KEY=VALUE"):
    gpu_step.parse_set("batch")


def test_scio_discrimination_scores_each_planted_clause_against_the_true_caption(smoke_run,
                                                                                 data_dir):
  """bench/scio.py's ceiling table: one row per sampled planted clause, under its field (whole
  caption and clause alone); a "planted" value equal to the true one is never scored higher
  (the wrong caption is built from the planted value, not read from elsewhere)."""
  from bench import scio_quality as quality  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_run
  config = smoke_config(data_dir)
  texts, ids = quality.captions(data_dir, config.data.dataset, config.data.split)
  initial, planted = quality.plant(texts, ids, "synthetic:train", rate=0.5, seed=0)
  out = quality.discrimination(config, workdir, data_dir, texts, initial, planted, limit=40,
                               seed=0)
  assert sum(len(rows) for rows in out.values()) == min(40, len(planted))
  for name, rows in out.items():
    assert name in caption_lib.OBSERVABLE_FIELDS
    assert rows.shape[1] == 4  # whole caption, then the clause alone: cosine, match
  every = np.concatenate(list(out.values()))
  assert 0 < every[:, 0].mean() < 1
  for i, k in planted:  # plant the true values: nothing to tell apart
    initial.rewrites[i][k] = texts[i].values[k]
  same = quality.discrimination(config, workdir, data_dir, texts, initial, planted, limit=40,
                                seed=0)
  assert not np.concatenate(list(same.values())).any()


def test_scio_table_bench_measures_a_table_that_round_trips(tmp_path):
  """bench.scio_table's table of n rows saves and restores through the checkpoint (it asserts
  the round trip) and stores its columns as arrays far smaller than the one-JSON layout."""
  from bench import scio_table  # pylint: disable=g-import-not-at-top
  figures = scio_table.measure(4000, str(tmp_path / "t"))
  assert figures["rows"] == 4000
  assert 0 < figures["arrays_mb"] < figures["one_json_mb"] / 3
  assert figures["meta_mb"] < figures["arrays_mb"]
