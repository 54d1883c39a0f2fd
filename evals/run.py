r"""The eval job: evaluates a training run's Orbax checkpoints, separately from training.

  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny          # watch
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny --once   # what is there
  python -m evals.run --config=configs/eval.py:tiny --workdir=workdirs/tiny --once --step=400

It lists the finished steps of DIR/checkpoints (Orbax renames a step directory only once its
save is complete, so a step being written is never read), evaluates each step not yet in the
ledger (DIR/eval/ledger.json) with every evaluator of the config, and writes
DIR/eval/metrics.jsonl (one line per step), TensorBoard events (DIR/eval/tb) and reports
(DIR/eval/step_N/report.md, DIR/eval/report.md). Watching ends once the run's last step
(config.json total_steps) is evaluated. It runs beside a training process on the same workdir,
on its own device count and mesh, in one process or several: it joins them with the trainer's
flags (`--coordinator_address`, `--num_processes`, `--process_id`, `--num_cpu_devices`; SLURM
and Cloud TPU need none, klip/distributed.py), and process 0 writes.

Faults: a missing eval dataset makes that evaluator "skipped: <reason>" and the others run; an
evaluator that raises is recorded with its traceback and the job goes on; a checkpoint that
fails to restore is logged, not entered in the ledger, and retried at the next poll. A step the
run saved but deleted (rotation: `checkpoint.keep`, `checkpoint.keep_period`) or set aside as
damaged before the job reached it is entered in the ledger and report as missed, with why. A
watcher started before the run waits for its config.json. Exit status 1: `--once` on a
directory that is not a training workdir, a step that did not restore, or no step at all.
"""

from __future__ import annotations

import time

import jax
from absl import app
from absl import flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from evals.job import Job
from klip import checkpoint as checkpoint_lib
from klip import distributed
from klip import host_memory
from klip import paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config (path:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory: a local path or "
                                "gs://BUCKET/PATH.")
_ONCE = flags.DEFINE_bool("once", False, "Evaluate the finished steps not yet evaluated, then "
                          "exit (default: keep watching until the run's last step).")
_STEP = flags.DEFINE_integer("step", None, "Evaluate only this step (again, if it was done).")
_ONLY = flags.DEFINE_list("only", None, "Run only these evaluators (names in config.evals).")


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  try:
    paths.require(_WORKDIR.value)  # before joining the other processes
  except paths.MissingPackage as e:
    raise SystemExit(f"evals.run: {e}") from None
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  distributed.initialize_from_flags()
  config = _CONFIG.value
  distributed.check_layout(config.mesh, jax.device_count(), jax.process_count())
  if (hint := host_memory.advice(jax.default_backend())) and jax.process_index() == 0:
    absl_logging.warning(hint)
  job = Job(config, _WORKDIR.value)
  print(f"evaluating {job.workdir} with {len(config.evals)} evaluators on "
        f"{jax.device_count()} devices (mesh {dict(job.mesh.shape)}); output in {job.eval_dir}",
        flush=True)
  try:
    if _STEP.value is not None:
      if _STEP.value not in checkpoint_lib.complete_steps(job.checkpoints):
        raise app.UsageError(f"no finished checkpoint at step {_STEP.value} in "
                             f"{job.checkpoints} (finished: "
                             f"{checkpoint_lib.complete_steps(job.checkpoints)})")
      if job.evaluate(_STEP.value, _ONLY.value) is None:
        raise SystemExit(1)
      return
    waiting = False
    while True:
      if not job.started():
        if _ONCE.value:
          raise SystemExit(f"evals.run: {job.workdir} is not a KLIP training workdir (no "
                           "config.json): nothing to evaluate")
        if not waiting:
          print(f"waiting for the run to start ({job.workdir}/config.json)", flush=True)
        waiting = True
        time.sleep(config.poll_seconds)
        continue
      for step in job.pending():
        job.evaluate(step, _ONLY.value)
      if _ONCE.value:
        break
      if job.last_step() in job.ledger:
        print(f"step {job.last_step()} (the run's last) is evaluated: done", flush=True)
        break
      time.sleep(config.poll_seconds)
  finally:
    job.close()
  print(f"ledger: {job.ledger.done}; missed: {sorted(job.ledger.missed) or 'none'}; report: "
        f"{epath.Path(job.eval_dir) / 'report.md'}", flush=True)
  if job.restore_failures:
    raise SystemExit(f"evals.run: {len(job.restore_failures)} step(s) did not restore: "
                     + "; ".join(f"{s}: {e}" for s, e in sorted(job.restore_failures.items())))
  if not job.ledger.done and not job.ledger.missed:
    raise SystemExit(f"evals.run: no finished checkpoint under {job.checkpoints}: nothing "
                     "was evaluated")


if __name__ == "__main__":
  app.run(main)
