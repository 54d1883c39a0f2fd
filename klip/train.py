r"""KLIP pretraining: one readable trainer, sectioned like big_vision's.

  python -m klip.train --config=configs/pretrain.py:tiny --workdir=workdirs/tiny

Resume order: the workdir's own latest checkpoint, else `config.init.checkpoint` (parameters
only, partial restore), else scratch; a damaged latest step is set aside and the one before it
restored. `--config.total_steps=N` on an existing workdir continues that run to step N; the
learning-rate schedule and SCIO's stages stay as fixed at the run's start (`schedule_steps`),
so steps past the schedule's end train at its final learning rate.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging as absl_logging
from flax import nnx
from flax.core import spmd as core_spmd
from etils import epath
from ml_collections import config_flags

from klip import checkpoint as checkpoint_lib
from klip import distributed
from klip import faults
from klip import host_memory
from klip import inference as inference_lib
from klip import init_from
from klip import metrics_writer
from klip import objectives
from klip import optim
from klip import paths
from klip import provenance
from klip import sharding
from klip import train_state
from klip.train_step import make_train_step
from klip.data import dataset as dataset_lib
from klip.data import values as values_lib
from klip.data import pipeline
from klip.data import schema
from klip.data import tokenizer as tokenizer_lib
from klip.scio import schedule as scio_schedule
from klip.scio import table as scio_table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, "
                                "tokenizer): a local path or gs://BUCKET/PATH.")
# Multi-process flags (--coordinator_address, --num_processes, ...): klip/distributed.py.


class NonFiniteError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# Data: the training split; the embedded synthetic corpus is built on first use.
# ---------------------------------------------------------------------------------------------
def _source(d):
  """The training split of config.data.dataset (a dataset or a "+" mixture)."""
  for part in dataset_lib.parts(d.dataset):
    _build_if_embedded(d.data_dir, part)
  return dataset_lib.source(d.data_dir, d.dataset, d.split)


def _build_if_embedded(data_dir: str, name: str) -> None:
  """Builds a missing embedded synthetic corpus; a real archive needs its source (the error
  says how to prepare it), and a half-written or corrupt dataset is not rebuilt."""
  try:
    dataset_lib.dataset_dir(data_dir, name)
    return
  except dataset_lib.DatasetMissingError:
    builder_name, _, config_name = name.partition("/")
    if builder_name != "synthetic" or os.path.isdir(os.path.join(data_dir, name)):
      raise
  if jax.process_index() == 0:
    from klip.data import prepare  # pylint: disable=g-import-not-at-top
    from klip.data.builders import synthetic  # pylint: disable=g-import-not-at-top
    print(f"building the embedded corpus {name} under {data_dir} (first use)", flush=True)
    prepare.prepare("synthetic", data_dir, generator=prepare.make_generator("rules", data_dir),
                    **synthetic.config_options(config_name))
  distributed.wait_for_all(f"klip_corpus_{name}")


# ---------------------------------------------------------------------------------------------
# Tokenizer: one per run, kept in the workdir.
# ---------------------------------------------------------------------------------------------
def _tokenizer(config, workdir: str, source) -> tokenizer_lib.Tokenizer:
  path = str(epath.Path(workdir) / "tokenizer.model")
  if not epath.Path(path).exists() and jax.process_index() == 0:
    if config.tokenizer.path:
      tokenizer_lib.install(config.tokenizer.path, path)
    else:
      n = min(len(source), config.tokenizer.max_sentences)
      print(f"training a {config.model.text.vocab_size}-piece tokenizer on {n} captions",
            flush=True)
      rows = np.linspace(0, len(source) - 1, n).astype(int)
      captions = (schema.structured_text(source[int(i)]).caption for i in rows)
      tokenizer_lib.train(captions, path, config.model.text.vocab_size, seed=config.seed)
  distributed.wait_for_all("klip_tokenizer")
  tok = tokenizer_lib.Tokenizer(path)
  if tok.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces, more than "
                     f"model.text.vocab_size={config.model.text.vocab_size}")
  return tok


# ---------------------------------------------------------------------------------------------
# Resume: what a run fixes at its start.
# ---------------------------------------------------------------------------------------------
class DiskFull(OSError):
  """The workdir's file system filled up: what is checkpointed is intact and resumable."""

  def __init__(self, workdir: str, step: int, error: Exception, complete: list[int]):
    reason = error.reason if isinstance(error, checkpoint_lib.SaveFailed) else str(error)
    newest = (f"the newest complete checkpoint is step {complete[-1]}, where the same command "
              "resumes" if complete else "no checkpoint is complete, so the same command "
              "starts again from step 0")
    super().__init__(errno.ENOSPC, f"no space left on device under {paths.resolve(workdir)} "
                     f"by step {step} ({reason}). Nothing is lost: {newest} once space is free")


def _no_space(error: BaseException) -> bool:
  """Whether an error (or one it was raised from) is a full disk (ENOSPC)."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class ResumeMismatch(ValueError):
  pass


def _fixed_at_start(config, saved: dict | None, workdir: str):
  """The config with `schedule_steps` resolved: the run's own (recorded in its checkpoints)
  when resuming, else `total_steps`. A resume with another seed or global batch (they fix the
  data order) or another `schedule_steps` is refused before anything is written."""
  fixed = optim.schedule_steps(config)
  if saved is not None:
    # Checkpoints from before schedule_steps was recorded: the schedule ran over total_steps.
    fixed = saved.get("schedule_steps", config.total_steps)
    pairs = {"seed": (saved.get("seed"), config.seed),
             "batch_size": (saved.get("global_batch"), config.batch_size)}
    if config.schedule_steps:  # 0 asks for nothing: the run's own schedule
      pairs["schedule_steps"] = (fixed, config.schedule_steps)
    for name, (theirs, ours) in pairs.items():
      if theirs is not None and theirs != ours:
        raise ResumeMismatch(
            f"{workdir} holds a run made with {name}={theirs} (checkpoint step "
            f"{saved['step']}); --config.{name}={ours} would change the steps it has taken. "
            f"Continue it with {name}={theirs}, or start a new --workdir (with "
            "--config.init.checkpoint to start from its parameters).")
    if config.total_steps > fixed and jax.process_index() == 0:
      print(f"extending the run past its schedule ({fixed} steps, fixed at its start): steps "
            f"{max(fixed, saved['step']) + 1}-{config.total_steps} train at the final learning "
            f"rate {config.optim.lr * config.optim.end_lr_fraction:.3g}", flush=True)
  if fixed == config.schedule_steps:
    return config
  config = config.copy_and_resolve_references()
  config.schedule_steps = fixed
  return config


# ---------------------------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------------------------
def train(config, workdir: str) -> dict:
  """Runs (or resumes) training to config.total_steps; returns the final summary."""
  # ----- setup --------------------------------------------------------------------------------
  wall_start = time.time()
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple((k, v) for k, v in config.sharding_rules)
  if config.batch_size % (config.grad_accum_steps * jax.process_count()):
    raise ValueError(f"batch_size {config.batch_size} must divide by grad_accum_steps "
                     f"{config.grad_accum_steps} x process count {jax.process_count()}")
  if config.loss.momentum.enabled and (
      config.grad_accum_steps > 1 or config.loss.momentum.queue_size % config.batch_size):
    raise ValueError(f"momentum distillation needs grad_accum_steps=1 and a queue_size "
                     f"({config.loss.momentum.queue_size}) that is a multiple of batch_size "
                     f"({config.batch_size})")
  batch_shards = int(np.prod([mesh.shape[a] for a in ("slice", "data", "fsdp")]))
  if (config.batch_size // config.grad_accum_steps) % batch_shards:
    raise ValueError(f"micro-batch {config.batch_size // config.grad_accum_steps} does not "
                     f"divide over the {batch_shards} batch shards of mesh {dict(mesh.shape)}")
  # After the checks: a refused run leaves no workdir (on GCS a prefix needs no creating).
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)

  # ----- input --------------------------------------------------------------------------------
  d = config.data
  source = _source(d)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                     keep_period=config.checkpoint.keep_period,
                                     async_save=config.checkpoint.async_save)
  config = _fixed_at_start(config, ckpt.newest_data(), workdir)
  tok = _tokenizer(config, workdir, source)
  fingerprints = dict(dataset_fingerprint=dataset_lib.fingerprint(d.data_dir, d.dataset),
                      tokenizer_fingerprint=tok.fingerprint())
  if ckpt.all_steps():
    provenance.check(workdir, config, **fingerprints)

  # ----- model, optimizer, sharding -----------------------------------------------------------
  # Created outside the mesh context: placement comes from the explicit shardings alone.
  graphdef, state, shardings = train_state.create(config, mesh, rules)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(state["model"], nnx.Param)))
  resumed = ckpt.restore_newest(state, shardings, any_process=inference_lib.Processes().any)
  resumed_from = None
  if resumed is not None:
    resumed_from, state, data_position = resumed
    step = int(data_position["step"])
    examples_seen = int(data_position["examples_seen"])
    print(f"resumed from step {step} in {ckpt.directory}", flush=True)
  else:
    step, examples_seen = 0, 0
    if config.init.checkpoint:
      state = init_from.load(state, shardings, config.init.checkpoint, config.model)
  # Recorded once the resume has succeeded: a refused one leaves the workdir's record alone.
  provenance.record(workdir, config, resumed_from=resumed_from, write=is_main, **fingerprints)
  if is_main:
    print(f"model: {n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)} over "
          f"{jax.device_count()} devices, {jax.process_count()} process(es)", flush=True)

  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    swap, rivals = objectives.swaps(config), objectives.clause_rival_count(config)
    batch_sh = {k: sharding.batch_sharding(mesh, rules, nd)
                for k, nd in (("image", 4), ("tokens", 2), ("clause", 2), ("weight", 1),
                              ("valid", 1), ("index", 1))
                + ((("swap_tokens", 2), ("has_swap", 1)) if swap else ())
                + ((("clause_tokens", 2),) if objectives.clause_tokens_len(config) else ())
                + ((("rival_tokens", 3), ("has_rival", 2)) if rivals else ())}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(make_train_step(config, graphdef),
                      in_shardings=(shardings, batch_sh, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=0)

    preprocess = pipeline.Preprocess(
        tokenizer_path=tok.path, image_size=config.model.image_size,
        channels=config.model.channels, max_len=config.model.text.max_len, db_min=d.db_min,
        db_max=d.db_max, train=True, gain_db=d.gain_db, max_shift=d.max_shift, flip_p=d.flip_p,
        clause_len=objectives.clause_tokens_len(config), swap=swap, rivals=rivals,
        pool=values_lib.ValuePool.sample(source) if swap or rivals else None)
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
    compiled_step = None
    # SCIO: the pair tables travel in the checkpoint; the pipeline reads the active one.
    saved_tables = ckpt.restore_table(resumed_from) if resumed_from is not None else None
    scio = scio_schedule.Controller(
        config, source, tok, preprocess,
        saved=scio_table.Tables.from_parts(*saved_tables) if saved_tables else None)
    scio_inference = (inference_lib.Inference(
        graphdef, shardings, mesh, rules, model_of=lambda merged: merged.model,
        compiler_options=inference_lib.scoring_options(mesh)) if scio.enabled else None)

    def open_batches():
      return pipeline.local_batches(
          source, dataclasses.replace(preprocess, table=scio.view()), seed=config.seed,
          global_batch=config.batch_size, start_example=examples_seen,
          process_index=jax.process_index(), process_count=jax.process_count(),
          num_workers=d.num_workers, num_threads=d.num_threads, name=f"{d.dataset}:{d.split}")

    if scio.enabled:
      batches = open_batches()

    def save(at_step, examples):
      if faults.at("fill_disk_at_step", at_step):
        ckpt.wait()  # the steps before are complete: the fault hits this step's save alone
        faults.fill_disk(workdir)
      ckpt.save(at_step, state, {"step": at_step, "examples_seen": examples,
                                 "global_batch": config.batch_size, "seed": config.seed,
                                 "schedule_steps": config.schedule_steps,
                                 "dataset": d.dataset}, tables=scio.payload())
      if faults.at("kill_in_save_at_step", at_step):
        faults.kill()

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
      if (at_step % config.log_every == 0 or at_step == config.total_steps
          or "scio/pass_seconds" in host):
        host.update(writer.progress(at_step, host))
        writer.write(at_step, host)
      return host

    try:
      while step < config.total_steps:
        if faults.at("kill_at_step", step):
          faults.kill()
        if scio.switch(examples_seen):  # a new pair table, from this epoch boundary on
          batches = open_batches()
        local = next(batches)
        extras = {"data/skipped": float(np.sum(local["valid"] == 0)),
                  "data/index_digest": zlib.crc32(np.ascontiguousarray(local["index"]).tobytes())}
        batch = {k: jax.make_array_from_process_local_data(batch_sh[k], v)
                 for k, v in local.items()}
        at = jnp.asarray(step, jnp.int32)
        if compiled_step is None:
          # Compiled ahead, then every process waits for the others: one that found the step in
          # the persistent compilation cache would otherwise start its collectives while another
          # still compiles, and CPU collectives (gloo) give up after 30 s.
          compiled_step = step_fn.lower(state, batch, at).compile()
          distributed.wait_for_all("klip_train_step_compiled")
        state, metrics = compiled_step(state, batch, at)
        step += 1
        examples_seen += config.batch_size
        if pending is not None:
          last_metrics = read(pending)
        pending = (step, metrics, extras)
        if scio.due(step):
          result = scio.rescore(
              scio_inference, state, step, examples_seen, wall_start,
              after_chunk=faults.kill if faults.at("kill_in_pass_at_step", step) else None)
          extras.update(result)
          if is_main:
            print(f"SCIO pass at step {step} (stage {int(result['scio/stage'])}, table v"
                  f"{int(result['scio/table_version'])}): {int(result['scio/rescored'])} pairs, "
                  f"flagged {result['scio/flag_rate']:.1%}, rewrote "
                  f"{result['scio/rewrite_rate']:.1%}, mean score change "
                  f"{result['scio/mean_score_change']:+.4f}, "
                  f"{result['scio/pass_seconds']:.1f} s ({result['scio/wall_share']:.1%} of wall "
                  "time)", flush=True)
        if timed is None and step - first_step == 2:
          timed = (step, time.time())  # exclude compilation from the throughput summary
        if (step % config.checkpoint.every_steps == 0 or step == config.total_steps
            or stop["sigterm"]):
          # The step's metrics row first: a kill after the save has committed loses no row.
          last_metrics, pending = read(pending), None
          save(step, examples_seen)
        if stop["sigterm"]:  # arrived before or during the save above, which holds this step
          print(f"SIGTERM: saving step {step} and exiting", flush=True)
          break
      if pending is not None:
        last_metrics = read(pending)
      ckpt.wait()
    except (OSError, checkpoint_lib.SaveFailed) as e:
      if not _no_space(e):
        raise
      writer.close(quiet=True)
      raise DiskFull(workdir, step, e, checkpoint_lib.complete_steps(ckpt.directory)) from None
    ckpt.close()
    writer.close()

  # ----- summary ------------------------------------------------------------------------------
  wall = time.time() - wall_start
  summary = {"steps": step, "first_step": first_step, "wall_seconds": wall,
             "stopped_by_sigterm": stop["sigterm"] and step < config.total_steps,
             "parameters": n_params, "workdir": paths.resolve(workdir),
             "checkpoints": ckpt.directory, "final": last_metrics}
  if timed is not None and step > timed[0]:
    summary["examples_per_s"] = (step - timed[0]) * config.batch_size / (time.time() - timed[1])
  if not last_metrics and writer.path.exists():  # nothing left to run: report the last
    summary["final"] = metrics_writer.read(writer.path)[-1]
  if is_main and writer.path.exists():
    summary["loss_plot"] = metrics_writer.plot_losses(
        writer.path, epath.Path(summary["workdir"]) / "loss.png")
    _print_summary(summary)
  return summary


def _print_summary(s: dict) -> None:
  final = s["final"]
  losses_text = ", ".join(f"{k}={v:.4f}" for k, v in final.items()
                          if k == "loss" or k.endswith("/loss"))
  lines = [
      "=" * 72,
      (f"KLIP run stopped by SIGTERM at step {s['steps']} (this invocation from step "
       f"{s['first_step']}); the same command resumes it" if s["stopped_by_sigterm"] else
       f"KLIP run finished: step {s['steps']} (this invocation from step {s['first_step']})"),
      f"  final losses : {losses_text}",
      f"  i2t accuracy : {final.get('contrast/i2t_accuracy', float('nan')):.3f} (in-batch)",
      f"  throughput   : {s.get('examples_per_s', float('nan')):.1f} examples/s "
      f"(after compilation)",
      f"  wall time    : {s['wall_seconds']:.0f} s; {s['parameters'] / 1e6:.2f}M parameters",
      f"  checkpoints  : {s['checkpoints']}",
      f"  metrics      : {epath.Path(s['workdir']) / 'metrics.jsonl'} "
      f"(TensorBoard: {epath.Path(s['workdir']) / 'tb'})",
      f"  loss plot    : {s.get('loss_plot')}",
      "=" * 72,
  ]
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  try:
    paths.require(_WORKDIR.value)  # before joining the other processes
  except paths.MissingPackage as e:
    raise SystemExit(f"klip.train: {e}") from None
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX log every save at INFO
    absl_logging.set_verbosity(absl_logging.WARNING)
  distributed.initialize_from_flags()
  distributed.check_layout(_CONFIG.value.mesh, jax.device_count(), jax.process_count())
  if (hint := host_memory.advice(jax.default_backend())) and jax.process_index() == 0:
    absl_logging.warning(hint)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except DiskFull as e:
    # Exits at once: the interpreter's teardown would only have TensorBoard's and Orbax's
    # writers report the full disk again, after this line.
    print(f"KLIP run stopped: {e.strerror}", file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
