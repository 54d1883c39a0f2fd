r"""KLIP pretraining: one readable trainer, sectioned like big_vision's.

  python -m klip.train --config=configs/pretrain.py:tiny --workdir=workdirs/tiny

Resume order: the workdir's own latest checkpoint, else `config.init.checkpoint` (parameters
only, partial restore), else scratch. `--config.total_steps=N` on an existing workdir continues
that run to step N.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx
from flax.core import spmd as core_spmd
from ml_collections import config_flags

from klip import checkpoint as checkpoint_lib
from klip import init_from
from klip import losses
from klip import metrics_writer
from klip import optim
from klip import provenance
from klip import sharding
from klip import train_state
from klip.data import dataset as dataset_lib
from klip.data import pipeline
from klip.data import schema
from klip.data import tokenizer as tokenizer_lib
from klip.model import two_tower

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, tokenizer).")


class NonFiniteError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# Tokenizer: one per run, kept in the workdir.
# ---------------------------------------------------------------------------------------------
def _tokenizer(config, workdir: str, source) -> tokenizer_lib.Tokenizer:
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path) and jax.process_index() == 0:
    if config.tokenizer.path:
      tokenizer_lib.install(config.tokenizer.path, path)
    else:
      n = min(len(source), config.tokenizer.max_sentences)
      print(f"training a {config.model.text.vocab_size}-piece tokenizer on {n} captions",
            flush=True)
      rows = np.linspace(0, len(source) - 1, n).astype(int)
      captions = (schema.structured_text(source[int(i)]).caption for i in rows)
      tokenizer_lib.train(captions, path, config.model.text.vocab_size, seed=config.seed)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("klip_tokenizer")
  tok = tokenizer_lib.Tokenizer(path)
  if tok.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces, more than "
                     f"model.text.vocab_size={config.model.text.vocab_size}")
  return tok


# ---------------------------------------------------------------------------------------------
# The train step: one jitted function, explicit shardings, donated state.
# ---------------------------------------------------------------------------------------------
def make_train_step(config, graphdef):
  accum = config.grad_accum_steps
  base_key = jax.random.key(config.seed)

  def loss_and_grads(model, batch, rng):
    mgraph, params = nnx.split(model)

    def loss_fn(p, mb):
      return losses.total(nnx.merge(mgraph, p), mb, rng, config)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]),
                         batch)

    def body(carry, mb):
      (loss, metrics), grads = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

    zero = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro)))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    total, _ = jax.lax.scan(body, zero, micro)
    return jax.tree.map(lambda x: x / accum, total)

  def train_step(state, batch, step):
    # copy=True: the optimizer updates Variables in place, and `state` must stay the old value.
    ts = nnx.merge(graphdef, state, copy=True)
    rng = jax.random.fold_in(base_key, step)
    (loss, metrics), grads = loss_and_grads(ts.model, batch, rng)
    if config.debug.nonfinite_at_step >= 0:  # fault hook for tests
      loss = jnp.where(step == config.debug.nonfinite_at_step, jnp.nan, loss)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = optim.schedule(config)(ts.optimizer.step[...])
    ts.optimizer.update(ts.model, grads)
    # A non-finite update is skipped: every array keeps its old value, the counter counts it.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nnx.state(ts), state)
    ts = nnx.merge(graphdef, new_state)
    ts.nonfinite[...] = ts.nonfinite[...] + (~finite).astype(jnp.int32)
    new_state = nnx.state(ts)
    params = nnx.state(ts.model, nnx.Param)
    metrics.update({"loss": loss, "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
                    "learning_rate": lr, "nonfinite_updates": ts.nonfinite[...],
                    "data/valid": jnp.sum(batch["valid"])})
    return new_state, metrics

  return train_step


# ---------------------------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------------------------
def train(config, workdir: str) -> dict:
  """Runs (or resumes) training to config.total_steps; returns the final summary."""
  # ----- setup --------------------------------------------------------------------------------
  wall_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple((k, v) for k, v in config.sharding_rules)
  if config.batch_size % (config.grad_accum_steps * jax.process_count()):
    raise ValueError(f"batch_size {config.batch_size} must divide by grad_accum_steps "
                     f"{config.grad_accum_steps} x process count {jax.process_count()}")
  batch_shards = int(np.prod([mesh.shape[a] for a in ("slice", "data", "fsdp")]))
  if (config.batch_size // config.grad_accum_steps) % batch_shards:
    raise ValueError(f"micro-batch {config.batch_size // config.grad_accum_steps} does not "
                     f"divide over the {batch_shards} batch shards of mesh {dict(mesh.shape)}")

  # ----- input --------------------------------------------------------------------------------
  d = config.data
  source = dataset_lib.source(d.data_dir, d.dataset, d.split)
  tok = _tokenizer(config, workdir, source)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
  resumed_from = ckpt.latest_step()
  provenance.record(workdir, config,
                    dataset_fingerprint=dataset_lib.fingerprint(d.data_dir, d.dataset),
                    tokenizer_fingerprint=tok.fingerprint(), resumed_from=resumed_from)

  # ----- model, optimizer, sharding -----------------------------------------------------------
  # Created outside the mesh context: placement comes from the explicit shardings alone.
  graphdef, state, shardings = train_state.create(config, mesh, rules)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(state["model"], nnx.Param)))
  if resumed_from is not None:
    state, data_position = ckpt.restore(resumed_from, state, shardings)
    step = int(data_position["step"])
    examples_seen = int(data_position["examples_seen"])
    print(f"resumed from step {step} in {ckpt.directory}", flush=True)
  else:
    step, examples_seen = 0, 0
    if config.init.checkpoint:
      state = init_from.load(state, shardings, config.init.checkpoint, config.model)
  if is_main:
    print(f"model: {n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)} over "
          f"{jax.device_count()} devices, {jax.process_count()} process(es)", flush=True)

  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    batch_sh = {k: sharding.batch_sharding(mesh, rules, nd)
                for k, nd in (("image", 4), ("tokens", 2), ("clause", 2), ("valid", 1),
                              ("index", 1))}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(make_train_step(config, graphdef),
                      in_shardings=(shardings, batch_sh, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=0)

    preprocess = pipeline.Preprocess(
        tokenizer_path=tok.path, image_size=config.model.image_size,
        channels=config.model.channels, max_len=config.model.text.max_len, db_min=d.db_min,
        db_max=d.db_max, train=True, gain_db=d.gain_db)
    batches = pipeline.local_batches(
        source, preprocess, seed=config.seed, global_batch=config.batch_size,
        start_example=examples_seen, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=d.num_workers,
        num_threads=d.num_threads, name=f"{d.dataset}:{d.split}")

    # ----- loop -------------------------------------------------------------------------------
    writer = metrics_writer.MetricsWriter(workdir, total_steps=config.total_steps,
                                          batch_size=config.batch_size, enabled=is_main)
    writer.truncate_after(step)
    stop = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    pending = None  # (step, device metrics, host extras): read one step late
    last_metrics, timed = {}, None
    first_step = step

    def save(at_step, examples):
      ckpt.save(at_step, state, {"step": at_step, "examples_seen": examples,
                                 "global_batch": config.batch_size, "seed": config.seed,
                                 "dataset": d.dataset})

    def read(pending):
      at_step, dev, extras = pending
      host = {k: float(v) for k, v in jax.device_get(dev).items()}
      host.update(extras)
      if host["nonfinite_updates"] > config.max_nonfinite_updates:
        ckpt.wait()
        raise NonFiniteError(
            f"non-finite loss or gradients at step {at_step}: the update was skipped "
            f"({int(host['nonfinite_updates'])} skipped so far, limit "
            f"max_nonfinite_updates={config.max_nonfinite_updates}). Last good checkpoint: "
            f"step {ckpt.latest_step()} in {ckpt.directory}")
      if at_step % config.log_every == 0 or at_step == config.total_steps:
        host.update(writer.progress(at_step, host))
        writer.write(at_step, host)
      return host

    while step < config.total_steps:
      if step == config.debug.exit_at_step:  # fault hook: die like a killed process
        os.kill(os.getpid(), signal.SIGKILL)
      local = next(batches)
      extras = {"data/skipped": float(np.sum(local["valid"] == 0)),
                "data/index_digest": zlib.crc32(np.ascontiguousarray(local["index"]).tobytes())}
      batch = {k: jax.make_array_from_process_local_data(batch_sh[k], v)
               for k, v in local.items()}
      state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
      step += 1
      examples_seen += config.batch_size
      if pending is not None:
        last_metrics = read(pending)
      pending = (step, metrics, extras)
      if timed is None and step - first_step == 2:
        timed = (step, time.time())  # exclude compilation from the throughput summary
      if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
        save(step, examples_seen)
      if stop["sigterm"]:
        print(f"SIGTERM: saving step {step} and exiting", flush=True)
        save(step, examples_seen)
        break
    if pending is not None:
      last_metrics = read(pending)
    ckpt.wait()
    ckpt.close()
    writer.close()

  # ----- summary ------------------------------------------------------------------------------
  wall = time.time() - wall_start
  summary = {"steps": step, "first_step": first_step, "wall_seconds": wall,
             "parameters": n_params, "workdir": os.path.abspath(workdir),
             "checkpoints": ckpt.directory, "final": last_metrics}
  if timed is not None and step > timed[0]:
    summary["examples_per_s"] = (step - timed[0]) * config.batch_size / (time.time() - timed[1])
  if not last_metrics and os.path.exists(writer.path):  # nothing left to run: report the last
    summary["final"] = metrics_writer.read(writer.path)[-1]
  if is_main and os.path.exists(writer.path):
    summary["loss_plot"] = metrics_writer.plot_losses(writer.path,
                                                      os.path.join(summary["workdir"],
                                                                   "loss.png"))
    _print_summary(summary)
  return summary


def _print_summary(s: dict) -> None:
  final = s["final"]
  losses_text = ", ".join(f"{k}={v:.4f}" for k, v in final.items()
                          if k == "loss" or k.endswith("/loss"))
  lines = [
      "=" * 72,
      f"KLIP run finished: step {s['steps']} (this invocation from step {s['first_step']})",
      f"  final losses : {losses_text}",
      f"  i2t accuracy : {final.get('contrast/i2t_accuracy', float('nan')):.3f} (in-batch)",
      f"  throughput   : {s.get('examples_per_s', float('nan')):.1f} examples/s "
      f"(after compilation)",
      f"  wall time    : {s['wall_seconds']:.0f} s; {s['parameters'] / 1e6:.2f}M parameters",
      f"  checkpoints  : {s['checkpoints']}",
      f"  metrics      : {os.path.join(s['workdir'], 'metrics.jsonl')} "
      f"(TensorBoard: {os.path.join(s['workdir'], 'tb')})",
      f"  loss plot    : {s.get('loss_plot')}",
      "=" * 72,
  ]
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
