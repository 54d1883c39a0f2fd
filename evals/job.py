"""The eval job's machinery: evaluate one checkpoint step with every evaluator, keep the
ledger, metrics, TensorBoard events and reports. `evals/run.py` is its command line.

With several processes every process restores the checkpoint, runs every evaluator (the
predictions are shared out between them, `klip.inference`) and computes the same metrics;
process 0 alone writes, and its list of pending steps is the one all of them follow."""

from __future__ import annotations

import importlib
import json
import time
import traceback

import jax
from etils import epath

from evals import artifacts as artifacts_lib
from evals import data as data_lib
from evals import ledger as ledger_lib
from evals import report as report_lib
from evals.predictor import Predictor
from klip import checkpoint as checkpoint_lib
from klip import faults
from klip import inference as inference_lib
from klip import paths
from klip import provenance
from klip import sharding
from klip.data import dataset as dataset_lib


def run_evaluators(config, predictor: Predictor, datasets: data_lib.Datasets,
                   directory: str, only=None, write: bool = True) -> list[report_lib.Outcome]:
  """Runs each evaluator of `config.evals` on one checkpoint; never raises for one of them."""
  outcomes = []
  names = [n for n in config.evals if not only or n in only]
  for i, name in enumerate(names):
    entry = dict(config.evals[name])
    kind = entry.pop("type")
    art = artifacts_lib.Artifacts(directory, name, write=write)
    start = time.time()
    print(f"[step {predictor.step}] ({i + 1}/{len(names)}) {name} ({kind}) ...", flush=True)
    try:
      module = importlib.import_module(kind if "." in kind else f"evals.{kind}")
      metrics = dict(module.Evaluator(predictor, datasets, **entry).run(art))
      outcome = report_lib.Outcome(name, kind, "ok", time.time() - start, metrics)
    except dataset_lib.DatasetMissingError as e:
      outcome = report_lib.Outcome(name, kind, "skipped", time.time() - start,
                                   detail=str(e).splitlines()[0])
    except Exception:  # pylint: disable=broad-except
      outcome = report_lib.Outcome(name, kind, "failed", time.time() - start,
                                   detail=traceback.format_exc())
    outcome.markdown = art.markdown
    outcomes.append(outcome)
    shown = ", ".join(f"{k}={v}" for k, v in report_lib.with_intervals(outcome.metrics)[:3])
    detail = shown if outcome.status == "ok" else outcome.detail.strip().splitlines()[-1][:160]
    print(f"[step {predictor.step}]     {name}: {outcome.status} in {outcome.seconds:.1f} s"
          f"{': ' + detail if detail else ''}", flush=True)
  return outcomes


def merged_rows(metrics_path: str) -> list[dict]:
  """One row per evaluated step of a metrics.jsonl: its rows merged in order (a later
  evaluation of the same evaluator, e.g. an `--only` rerun or the rerun of a step whose job was
  killed before its ledger entry, replaces that evaluator's metrics and status)."""
  if not epath.Path(metrics_path).exists():
    return []
  merged: dict[int, dict] = {}
  with epath.Path(metrics_path).open() as f:
    for row in (json.loads(line) for line in f if line.strip()):
      into = merged.setdefault(row["step"], {"step": row["step"], "metrics": {},
                                             "skipped": {}, "failed": {}})
      names = set(row.get("evaluator_seconds", {}))
      for part in ("metrics", "skipped", "failed"):
        into[part] = {k: v for k, v in into[part].items() if k.split("/")[0] not in names}
        into[part].update(row[part])
  return list(merged.values())


class Job:
  """One eval config watching one training workdir (local or gs://; its outputs go through
  klip/paths.py)."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = paths.resolve(workdir)
    self.eval_dir = str(epath.Path(self.workdir) / "eval")
    self.checkpoints = str(epath.Path(self.workdir) / "checkpoints")
    self.processes = inference_lib.Processes()
    self.writes = self.processes.index == 0
    self.ledger = ledger_lib.Ledger(epath.Path(self.eval_dir) / "ledger.json",
                                    write=self.writes)
    self.metrics_path = str(epath.Path(self.eval_dir) / "metrics.jsonl")
    self.mesh = sharding.make_mesh(config.mesh)
    self._tb = None
    self._datasets = None
    self.restore_failures: dict[int, str] = {}  # step -> error, for the steps still on disk

  def started(self) -> bool:
    """Whether the training run has recorded its config (WORKDIR/config.json)."""
    return (epath.Path(self.workdir) / "config.json").exists()

  def pending(self) -> list[int]:
    """The finished steps not yet evaluated, as process 0 sees them (a checkpoint that lands
    between two processes' looks is not evaluated by one of them alone). The steps the run
    saved and no longer has are first entered in the ledger as missed (`gone`)."""
    finished = checkpoint_lib.complete_steps(self.checkpoints)
    steps = [s for s in finished if s not in self.ledger.done]  # a missed step may come back
    gone = self.gone(finished)
    if self.processes.count > 1:
      steps, gone = self.processes.gather_json([steps, gone])[0]
    for step, reason in gone:
      self._missed(step, reason)
    return steps

  def gone(self, finished: list[int]) -> list[tuple[int, str]]:
    """(step, why) for each step the run saved that is neither finished on disk nor in the
    ledger: set aside as damaged (WORKDIR/checkpoints_skipped/STEP), or a multiple of its
    `checkpoint.every_steps` below its newest finished step, deleted by checkpoint rotation."""
    if not self.started():
      return []
    cfg = provenance.read_config(self.workdir).checkpoint
    settled = set(finished) | set(self.ledger.done) | set(self.ledger.missed)
    aside = checkpoint_lib.set_aside_dir(self.checkpoints)
    out = {s: f"set aside as damaged by the trainer ({aside}/{s})"
           for s in checkpoint_lib.set_aside_steps(self.checkpoints) if s not in settled}
    rotation = (f"deleted by checkpoint rotation before it was evaluated (the run's checkpoint "
                f"config: {json.dumps(cfg.to_dict(), sort_keys=True)}; keep and keep_period "
                "say which steps survive)")
    for s in range(cfg.every_steps, max(finished, default=0), cfg.every_steps):
      if s not in settled:
        out.setdefault(s, rotation)
    return sorted(out.items())

  def _missed(self, step: int, reason: str) -> None:
    self.ledger.mark_missed(step, reason)
    self.restore_failures.pop(step, None)
    print(f"[step {step}] missed: {reason}", flush=True)
    if self.writes:
      report_lib.write_index(self.eval_dir, self.rows(), self.ledger.missed)

  def evaluate(self, step: int, only=None) -> dict | None:
    """Evaluates one step; returns its metrics row, or None if the checkpoint did not restore."""
    start = time.time()
    predictor, error = None, ""
    try:
      predictor = Predictor.restore(self.workdir, step, mesh=self.mesh,
                                    batch_size=self.config.batch_size)
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"
    if self.processes.count > 1:  # all go on, or none
      errors = [e for e in self.processes.gather_json(error) if e]
      error = error or (errors[0] if errors else "")
    if error:
      if step not in checkpoint_lib.complete_steps(self.checkpoints):
        self._missed(step, f"deleted while the job restored it ({error})")
        return None
      print(f"[step {step}] checkpoint did not restore ({error}); not marked done, retried at "
            "the next poll", flush=True)
      self.restore_failures[step] = error
      return None
    self.restore_failures.pop(step, None)
    train_cfg = predictor.config
    if self._datasets is None:  # records are read once and kept for the later steps
      self._datasets = data_lib.Datasets(
          self.config.datasets, data_dir=self.config.data_dir,
          source_root=self.config.source_root, pretrain=train_cfg.data,
          max_examples=self.config.max_examples)
    datasets = self._datasets
    directory = str(epath.Path(self.eval_dir) / f"step_{step}")
    outcomes = run_evaluators(self.config, predictor, datasets, directory, only,
                              write=self.writes)
    row = {"step": step, "time": time.time(), "seconds": time.time() - start,
           "metrics": {f"{o.name}/{k}": v for o in outcomes for k, v in o.metrics.items()},
           "skipped": {o.name: o.detail for o in outcomes if o.status == "skipped"},
           "failed": {o.name: o.detail for o in outcomes if o.status == "failed"},
           "evaluator_seconds": {o.name: round(o.seconds, 2) for o in outcomes}}
    report = "(written by process 0)"
    if self.writes:
      report = report_lib.write_step(directory, step, outcomes, {
          "workdir": self.workdir, "training variant": train_cfg.get("variant", "?"),
          "devices": f"{jax.device_count()} ({jax.devices()[0].platform}), "
                     f"{self.processes.count} process(es)",
          "wall time": f"{row['seconds']:.0f} s"})
      self._append(row)
      report_lib.write_index(self.eval_dir, self.rows(), self.ledger.missed)
    if faults.at("kill_in_eval_at_step", step):
      faults.kill()
    if not only:
      self.ledger.mark(step, seconds=round(row["seconds"], 1), failed=sorted(row["failed"]),
                       skipped=sorted(row["skipped"]))
    print(f"[step {step}] done in {row['seconds']:.0f} s: {len(outcomes)} evaluators, "
          f"{len(row['skipped'])} skipped, {len(row['failed'])} failed; report {report}",
          flush=True)
    return row

  def rows(self) -> list[dict]:
    return merged_rows(self.metrics_path)

  def _append(self, row: dict) -> None:
    epath.Path(self.eval_dir).mkdir(parents=True, exist_ok=True)
    paths.append(self.metrics_path, json.dumps(row) + "\n")
    if self._tb is None:  # tensorboardX writes gs:// through google-cloud-storage
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(epath.Path(self.eval_dir) / "tb"))
    for name, value in row["metrics"].items():
      self._tb.add_scalar(name, value, row["step"])
    self._tb.flush()

  def last_step(self) -> int:
    return int(provenance.read_config(self.workdir).total_steps)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
