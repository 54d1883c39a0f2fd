"""The trainer: sharding parity, the smoke run, resume, faults and provenance."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd as core_spmd

from conftest import smoke_config
from klip import faults
from klip import objectives
from klip import predict
from klip import metrics_writer
from klip import provenance
from klip import sharding
from klip import train
from klip import train_state
from klip.data import dataset as dataset_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_batch(config, n=8, seed=0):
  rng = np.random.default_rng(seed)
  m = config.model
  tokens = rng.integers(6, m.text.vocab_size, (n, m.text.max_len)).astype(np.int32)
  tokens[:, 0] = 2
  tokens[:, 40:] = 0  # padding
  batch = {"image": rng.normal(size=(n, m.image_size, m.image_size, m.channels)).astype(
               np.float32),
           "tokens": tokens, "clause": np.full_like(tokens, -1),
           "weight": np.ones((n,), np.float32), "valid": np.ones((n,), np.int32),
           "index": np.arange(n, dtype=np.int32)}
  if config.loss.clause_negatives:
    swap = tokens.copy()
    swap[:, 5:8] = rng.integers(6, m.text.vocab_size, (n, 3))
    batch.update(swap_tokens=swap, has_swap=(np.arange(n) % 4 != 0).astype(np.int32))
  if config.loss.clause_contrast_weight:  # one clause alone (its first tokens)
    batch["clause_tokens"] = tokens[:, :config.loss.clause_max_len].copy()
    if config.loss.clause_rivals:  # ... and that clause with two tokens replaced, some padded
      rivals = np.repeat(batch["clause_tokens"][:, None], config.loss.clause_rivals, axis=1)
      rivals[..., 36:38] = rng.integers(6, m.text.vocab_size, rivals[..., 36:38].shape)
      has = np.ones((n, config.loss.clause_rivals), np.int32)
      has[::3, -1] = 0
      rivals[has == 0] = 0
      batch.update(rival_tokens=rivals, has_rival=has)
  return batch


def _loss_and_grads(config, mesh_dims, devices):
  mesh = sharding.make_mesh(dict(slice=1, **mesh_dims), devices)
  rules = config.sharding_rules
  graphdef, state, _ = train_state.create(config, mesh, rules)
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    model = nnx.merge(graphdef, state).model
    mgraph, params = nnx.split(model)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, rules, v.ndim))
             for k, v in _random_batch(config).items()}

    @jax.jit
    def fn(p, b):
      return jax.value_and_grad(
          lambda p: objectives.total(nnx.merge(mgraph, p), b, jax.random.key(0), config),
          has_aux=True)(p)

    (loss, _), grads = fn(params, batch)
    kernel = params["image"]["encoder"]
    return float(loss), jax.tree.map(np.asarray, grads), kernel


# the default smoke model, and one whose matching runs only the top text block on the lower
# states of the contrastive pass, with clause-swap negatives and clause rivals
@pytest.mark.parametrize("overrides", [{}, {"model.text.fusion_layers": 1,
                                            "loss.clause_negatives": True,
                                            "loss.clause_contrast_weight": 1.0,
                                            "loss.clause_rivals": 2}])
def test_sharded_step_equals_unsharded(data_dir, overrides):
  config = smoke_config(data_dir, **overrides)
  assert jax.device_count() == 8
  loss1, g1, _ = _loss_and_grads(config, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  loss8, g8, kernel = _loss_and_grads(config, dict(data=2, fsdp=2, tensor=2), jax.devices())
  # the (2,2,2) run really is sharded over fsdp and tensor
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(kernel)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  flat8 = np.concatenate([x.ravel() for x in jax.tree.leaves(g8)])
  flat1 = np.concatenate([x.ravel() for x in jax.tree.leaves(g1)])
  assert np.linalg.norm(flat8 - flat1) <= 1e-5 * np.linalg.norm(flat1)
  # Per tensor too, except those whose gradient is analytically zero (the key bias: softmax
  # ignores a shift shared by all keys), where float32 noise of ~1e-8 is all there is.
  floor = 1e-4 * np.linalg.norm(flat1)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    if np.linalg.norm(b) > floor:
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), a.shape


def test_smoke_run_writes_checkpoints_metrics_and_plot(smoke_run):
  workdir, summary = smoke_run
  rows = metrics_writer.read(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 11))
  assert all(np.isfinite(r["loss"]) and r["data/valid"] == 8 for r in rows)
  assert rows[-1]["contrast/loss"] < rows[0]["contrast/loss"]  # it learns something
  assert 10 in [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()]
  for name in ("config.json", "tokenizer.model", "loss.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tb"))
  with open(os.path.join(workdir, "config.json")) as f:
    prov = json.load(f)
  assert prov["config"]["variant"] == "smoke"
  assert prov["versions"]["jax"] == jax.__version__
  assert len(prov["dataset_fingerprint"]) == 16 and len(prov["tokenizer_fingerprint"]) == 16
  assert summary["steps"] == 10 and summary["final"]["loss"] == rows[-1]["loss"]


def _run_cli(workdir, data_dir, *overrides):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run(
      [sys.executable, "-m", "klip.train", "--config=configs/pretrain.py:smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_continues_an_existing_run(smoke_run, data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(smoke_run[0], workdir)
  out = _run_cli(workdir, data_dir, "--config.total_steps=12")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 10" in out.stdout
  rows = metrics_writer.read(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert "12" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_config_typo_fails_at_parse_time_naming_the_key(tmp_path, data_dir):
  out = _run_cli(str(tmp_path / "w"), data_dir, "--config.total_stepz=3")
  assert out.returncode != 0
  assert "total_stepz" in out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_missing_data_dir_says_how_to_build_it(tmp_path):
  config = smoke_config(str(tmp_path / "nothing_here"), **{"data.dataset": "mstar/depression17"})
  with pytest.raises(dataset_lib.DatasetMissingError,
                     match=r"python -m klip.data.prepare --dataset=mstar --data_dir="):
    train.train(config, str(tmp_path / "w"))


def test_missing_synthetic_message_names_its_options(tmp_path):
  with pytest.raises(dataset_lib.DatasetMissingError,
                     match=r"--dataset=synthetic .*--num_chips=160 --image_size=32"):
    dataset_lib.source(str(tmp_path), "synthetic/n160_s32_c2_seed0", "train")


def test_embedded_corpus_is_built_on_first_use(tmp_path, capsys):
  config = smoke_config(str(tmp_path / "data"), total_steps=1,
                        **{"data.dataset": "synthetic/n40_s32_c1_seed3"})
  summary = train.train(config, str(tmp_path / "w"))
  assert "building the embedded corpus synthetic/n40_s32_c1_seed3" in capsys.readouterr().out
  assert summary["steps"] == 1
  assert os.path.isdir(tmp_path / "data" / "synthetic" / "n40_s32_c1_seed3")


def test_resume_against_another_dataset_is_refused(smoke_run, data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(smoke_run[0], workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    prov = json.load(f)
  prov["dataset_fingerprint"] = "0123456789abcdef"
  with open(path, "w") as f:
    json.dump(prov, f)
  with pytest.raises(provenance.ProvenanceMismatch, match="dataset fingerprint 0123456789abcdef"):
    train.train(smoke_config(data_dir, total_steps=12), workdir)


def test_nonfinite_loss_stops_naming_step_and_checkpoint(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv(faults.ENV, "nonfinite_loss_at_step=6")
  config = smoke_config(data_dir)
  with pytest.raises(train.NonFiniteError,
                     match=r"at step 7: the update was skipped .* Last good checkpoint: step 5"):
    train.train(config, str(tmp_path / "w"))


def test_nonfinite_update_is_skipped_when_tolerated(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv(faults.ENV, "nonfinite_loss_at_step=2")
  config = smoke_config(data_dir, max_nonfinite_updates=1, total_steps=4)
  summary = train.train(config, str(tmp_path / "w"))
  rows = metrics_writer.read(os.path.join(str(tmp_path / "w"), "metrics.jsonl"))
  assert [r["nonfinite_updates"] for r in rows] == [0, 0, 1, 1]
  assert summary["steps"] == 4 and np.isfinite(rows[-1]["param_norm"])
  # the skipped step left the parameters untouched
  assert rows[2]["param_norm"] == rows[1]["param_norm"]


def test_nonfinite_step_leaves_the_whole_state_unchanged(data_dir, monkeypatch):
  """A skipped update keeps parameters and optimizer state bitwise; only the counter moves."""
  from klip import train_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(faults.ENV, "nonfinite_loss_at_step=2")
  config = smoke_config(data_dir)
  mesh = sharding.make_mesh(dict(slice=1, data=1, fsdp=1, tensor=1), jax.devices()[:1])
  rules = config.sharding_rules
  graphdef, state, _ = train_state.create(config, mesh, rules)
  flat = lambda s: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(s)}
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    step_fn = jax.jit(train_step.make_train_step(config, graphdef))
    batch = _random_batch(config)
    state, _ = step_fn(state, batch, 0)  # the learning rate warms up from 0 at step 0
    s0 = flat(state)
    state, _ = step_fn(state, batch, 1)
    s1 = flat(state)
    state, metrics = step_fn(state, batch, 2)
    s2 = flat(state)
  assert int(metrics["nonfinite_updates"]) == 1
  moved = {k for k in s0 if not np.array_equal(s0[k], s1[k])}
  assert any("opt_state" in k and "mu" in k for k in moved), sorted(moved)  # step 1 updated
  assert any("model" in k and "kernel" in k for k in moved), sorted(moved)
  changed = {k for k in s1 if not np.array_equal(s1[k], s2[k])}
  assert changed == {k for k in s1 if "nonfinite" in k}, sorted(changed)


def test_momentum_step_enqueues_the_momentum_features(data_dir):
  """The momentum encoders' features of the batch come back from the objective by name and
  fill the next queue rows."""
  from klip import train_step  # pylint: disable=g-import-not-at-top
  config = smoke_config(data_dir, **{"loss.momentum.enabled": True,
                                     "loss.momentum.queue_size": 16})
  mesh = sharding.make_mesh(dict(slice=1, data=1, fsdp=1, tensor=1), jax.devices()[:1])
  rules = config.sharding_rules
  graphdef, state, _ = train_state.create(config, mesh, rules)
  batch, b = _random_batch(config), config.batch_size
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    before = nnx.merge(graphdef, state)
    queue0 = np.asarray(before.image_queue[...])
    # at step 0 the momentum encoders are the model's initial copy
    want = np.asarray(predict.embed_images(before.momentum, batch["image"])[0])
    step_fn = jax.jit(train_step.make_train_step(config, graphdef))
    state, metrics = step_fn(state, batch, 0)
  ts = nnx.merge(graphdef, state)
  assert int(ts.queue_ptr[...]) == b and np.isfinite(float(metrics["loss"]))
  queue = np.asarray(ts.image_queue[...])
  np.testing.assert_allclose(queue[:b], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(queue[b:], queue0[b:])


def _final_params(workdir):
  from klip import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  return checkpoint_lib.read_params(workdir)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(smoke_run, data_dir):
  from klip import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_run
  config = smoke_config(data_dir)
  rules = config.sharding_rules
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
  restored = []
  for dims, devices in ((dict(data=2, fsdp=2, tensor=2), jax.devices()),
                        (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                        (dict(data=1, fsdp=2, tensor=2), jax.devices()[4:])):
    mesh = sharding.make_mesh(dict(slice=1, **dims), devices)
    _, state, shardings = train_state.create(config, mesh, rules)
    state, data = ckpt.restore(10, state, shardings)
    assert data == {"step": 10, "examples_seen": 80, "global_batch": 8, "seed": 0,
                    "schedule_steps": 10, "dataset": config.data.dataset}
    leaf = jax.tree.leaves(state)[5]
    assert set(leaf.sharding.mesh.devices.flat) <= set(devices)
    restored.append(jax.tree.map(np.asarray, nnx.to_pure_dict(state)))
  for other in restored[1:]:
    for x, y in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(other)):
      np.testing.assert_array_equal(x, y)
  ckpt.close()


def test_init_from_another_run_copies_and_resizes(smoke_run, data_dir, tmp_path, capsys):
  from klip import init_from  # pylint: disable=g-import-not-at-top
  # a 64 px model from the 32 px smoke run: its sine-cosine position embeddings are no
  # parameter, so every parameter is copied as it is
  config = smoke_config(data_dir, **{"model.image_size": 64})
  mesh = sharding.make_mesh(config.mesh)
  _, state, shardings = train_state.create(config, mesh, config.sharding_rules)
  init_from.load(state, shardings, smoke_run[0], config.model)
  out = capsys.readouterr().out
  assert "resized none" in out and "0 left at init" in out
  # learned position embeddings: the 4x4 grid becomes 8x8, everything else is copied
  workdir = str(tmp_path / "learned")
  train.train(smoke_config(data_dir, total_steps=2, **{"model.posemb": "learned"}), workdir)
  capsys.readouterr()
  config = smoke_config(data_dir, **{"model.image_size": 64, "model.posemb": "learned"})
  _, state, shardings = train_state.create(config, mesh, config.sharding_rules)
  fresh_posemb = np.asarray(state["model"]["image"]["posemb"][...])
  state = init_from.load(state, shardings, workdir, config.model)
  out = capsys.readouterr().out
  assert "resized ['image/posemb (16, 32) -> (64, 32)']" in out and "0 left at init" in out
  source = _final_params(workdir)
  np.testing.assert_array_equal(np.asarray(state["model"]["text"]["embed"]["embedding"][...]),
                                source["text"]["embed"]["embedding"])
  posemb = np.asarray(state["model"]["image"]["posemb"][...])
  assert posemb.shape == (64, 32) and not np.allclose(posemb, fresh_posemb)
  np.testing.assert_allclose(posemb.mean(0), source["image"]["posemb"].mean(0), atol=0.02)


def test_clause_negatives_and_rivals_train_and_log_their_accuracy(data_dir, tmp_path):
  config = smoke_config(data_dir, total_steps=4, **{
      "loss.clause_negatives": True, "loss.clause_contrast_weight": 1.0,
      "loss.clause_rivals": 3, "model.text.fusion_layers": 1, "scio.enabled": True,
      "scio.every_steps": 2, "scio.slice_size": 16, "scio.batch_size": 8,
      "scio.warmup_fraction": 0.25})
  summary = train.train(config, str(tmp_path / "w"))
  rows = metrics_writer.read(os.path.join(str(tmp_path / "w"), "metrics.jsonl"))
  assert summary["steps"] == 4 and np.isfinite(summary["final"]["loss"])
  assert all(0.0 <= r["match/swap_accuracy"] <= 1.0 for r in rows)
  assert all(0.0 <= r["clause_rivals/accuracy"] <= 1.0 and r["clause_rivals/loss"] > 0
             for r in rows if "loss" in r)
  # the rescoring pass reads its images without the training-only swaps and rivals
  passes = [r for r in rows if "scio/rescored" in r]
  assert passes and all(r["scio/rescored"] == 16 for r in passes)


def test_learning_levers_train_and_scio_reads_every_pair(data_dir, tmp_path):
  """GAP pooling, sine-cosine position embeddings, the cosine in the match logit and clause
  contrast train together, and the SCIO pass still reads every pair of its slice (with clause
  contrast on, its evaluation preprocessing once drew clauses without a random generator and
  skipped every record: 0 pairs rescored)."""
  config = smoke_config(data_dir, total_steps=4, **{
      "model.pool": "gap", "model.posemb": "sincos2d", "model.match_cosine": True,
      "model.text.fusion_layers": 1, "loss.clause_contrast_weight": 1.0,
      "scio.enabled": True, "scio.every_steps": 2, "scio.slice_size": 16,
      "scio.batch_size": 8, "scio.warmup_fraction": 0.25})
  summary = train.train(config, str(tmp_path / "w"))
  rows = metrics_writer.read(os.path.join(str(tmp_path / "w"), "metrics.jsonl"))
  assert summary["steps"] == 4 and np.isfinite(summary["final"]["loss"])
  assert all(np.isfinite(r["clause_contrast/loss"]) and np.isfinite(r["match/loss"])
             for r in rows)
  passes = [r for r in rows if "scio/rescored" in r]
  assert passes and all(r["scio/rescored"] == 16 for r in passes)


def test_grad_accumulation_and_bfloat16_train(data_dir, tmp_path):
  config = smoke_config(data_dir, grad_accum_steps=2, total_steps=3, batch_size=16,
                        **{"model.dtype": "bfloat16", "model.scan_layers": True,
                           "model.remat_policy": "dots_saveable"})
  summary = train.train(config, str(tmp_path / "w"))
  assert summary["steps"] == 3 and np.isfinite(summary["final"]["loss"])


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  proc = subprocess.Popen(
      [sys.executable, "-m", "klip.train", "--config=configs/pretrain.py:smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       "--config.total_steps=100000", "--config.checkpoint.every_steps=100000"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert "SIGTERM: saving step" in stdout
  step = int(stdout.split("SIGTERM: saving step ")[1].split()[0])
  assert str(step) in os.listdir(workdir / "checkpoints")


def test_describe_base_on_8_devices(data_dir):
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  d = train_state.describe(pretrain.get_config("base"))
  vit_b16 = 86e6
  text = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 32000 * 768
  assert abs(d["two_tower"] - (vit_b16 + text)) / (vit_b16 + text) < 0.1
  assert d["parameters"] > d["two_tower"] + d["fusion_cross_attention"]  # + decoder
  assert d["mesh"]["data"] == 8
