r"""Learning benchmark: what pretraining taught the image tower, per task, against references.

  # evaluate the latest finished checkpoint of an existing run
  python -m bench.learning --workdir=workdirs/tiny
  # first train (or resume, or find finished) a pretraining variant into W, then evaluate it
  python -m bench.learning --variant=small --workdir=workdirs/small
  python -m bench.learning --variant=tiny --workdir=/tmp/learn_tiny --data_dir=/tmp/data
  # without the supervised ceiling, or with a fixed budget for it
  python -m bench.learning --workdir=W --ceiling_seconds=0      # skip it
  python -m bench.learning --workdir=W --ceiling_seconds=120

Per task, on the pretrained model (the latest complete checkpoint, or `--step`):
- zero-shot: the class whose prompt ensemble is nearest in the shared image-text space
  (evals/zeroshot.py's `class_prompts` and `class_embeddings`; count and position classes are
  written as evals/answers.py writes VQA candidates, one caption clause each; "n/a" where a
  label has no prompt form);
- probe: evals/linear_probe.py's recipe (standardised pooled features, L-BFGS logistic
  regression, the eval config's l2 and iterations);
- kNN: evals/knn.py's weighted vote (k from the eval config) on the same pooled features,
  standardised then unit-normalised (evals/knn.py itself votes on the projected embedding);
and three references on the same splits:
- pixel probe: the same probe on the model's input pixels (after preprocessing: crop or
  resample, dB clipping, scaling to [-1, 1]) flattened; inputs of more than PIXEL_LIMIT values
  are 2x2 average-pooled first (the table marks it "(2x)");
- random-init probe: the same probe on a model of the run's config initialised as the trainer
  initialises it (`klip.train_state.create`: nnx.Rngs(config.seed)), never trained;
- supervised ceiling: that same initial image tower (klip's ViT, the run's config) with one
  linear head per task on the pooled vector (`ViT.pool`), trained from scratch with the summed
  cross-entropies of all tasks (multi-task; each head on the examples that carry its label) on
  the pretraining data's train split (a task whose dataset the run did not pretrain on, e.g.
  OpenSARShip, or MSTAR for `tiny`, trains on its probe's fit split: the only labels it has),
  with the run's
  optimizer (klip/optim.py: AdamW, warmup-cosine, clipping; the warmup the same fraction of the
  steps), batch size, seed and training-time augmentation (klip.data.pipeline.Preprocess), for
  as long as the pretraining trained (`--ceiling_seconds` overrides; 0 skips it). Both times
  leave compilation out: the pretraining's is reconstructed from metrics.jsonl (each logged
  interval's steps over its `perf/steps_per_s`; the first interval of each invocation, which
  holds the compilation, at the median step time), and the ceiling's clock starts after its
  step compiled. The ceiling's step count is planned from three timed steps so that its
  schedule ends with the budget; it is scored by its own heads on the same test splits.
Columns: probe / ceiling; chance, the best constant answer's accuracy on the test split (the
majority share; at least 1 / number of classes); n_train, n_test: labelled chips of the probe's
fit split and of the test split.

Tasks:
- mstar_subtype: the MSTAR class (mstar/depression17, prepared from ../shared/data/mstar/train
  on first use). Its splits hold out whole aspect sectors per class: fit on train, score test;
  a run that pretrained on MSTAR's train split (small) fits on val (evals/data.py refuses the
  pretraining split; configs/eval.py does the same). Skipped with the reason printed when it is
  neither prepared nor preparable.
- opensarship_subtype: the AIS ship type (opensarship/default): fit on train, score test.
- synthetic_category / _count / _landcover / _position / _terrain, on the run's synthetic
  corpus (its train split is the pretraining data): fit on val, score test. The corpus splits
  by city (5 cities each in val and test, 40 in train), and terrain is a property of the city:
  fitted on val, the terrain probe learns 5 cities' landforms (the test split's lake plain is
  not among them).
- `--fit=train` fits every task's probes and k-NN on its train split instead, the pretraining
  split included (the linear-probe protocol of SimCLR and MAE: the probe sees images the
  pretraining saw, the test split stays held out): about 10x the synthetic fit chips, from 40
  cities instead of 5. The references use the same fit split.
  Synthetic labels: category: the first
  target's category; count: the exact number of targets (target chips); landcover: the mask's
  dominant class; terrain: the scene's landform (`terrain` metadata, e.g. "coastal plain");
  position: the 3x3-grid cell of a target, as evals/answers.py's VQA position question: every
  cell holding a target's centre is a right answer (a multi-label; one prediction per chip,
  right when it names an occupied cell). The probe and the ceiling fit it as cross-entropy
  against the uniform distribution over the occupied cells (a chip is one training row per
  occupied cell), k-NN votes with each neighbour's occupied cells; chance is the share of test
  chips holding a target in the most often occupied cell.
Captioning (the pretrained model, evals/captioning.py, greedy, on `--caption_examples` chips of
the synthetic test split): accuracy per observable field (caption.OBSERVABLE_FIELDS) in content
(evals/captioning.py `content`: the number, the grid cells, the cover class, wording and
metadata aside) and word for word (exact value after normalisation), and `repetition`, the
share of generated values with a phrase of 1-4 tokens repeated 3+ times in a row; against the
constant captioner on the same chips (evals/captioning.py `constant_matches`: each field's most
frequent value, or content, in the pretraining corpus's train split, whatever the image).

It prints the table, appends one row per task and one for captioning and timings to
bench/RESULTS.md (date, bench `learning/<task>`, command, machine and load; figures with the
variant, step and git commits), writes bench/out/learning.json ($OUT when set) and keeps the
captioning report under W/bench_learning/.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time

from bench import common  # before jax: the CPU platform unless JAX_PLATFORMS is set

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-order
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-order
from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top,wrong-import-order

from bench import learning_ceiling as ceiling_lib  # pylint: disable=g-import-not-at-top
from bench import learning_tasks as tasks_lib  # pylint: disable=g-import-not-at-top
from bench.learning_tasks import log  # pylint: disable=g-import-not-at-top
from configs import eval as eval_configs  # pylint: disable=g-import-not-at-top
from evals import captioning  # pylint: disable=g-import-not-at-top
from evals import data as data_lib  # pylint: disable=g-import-not-at-top
from evals import zeroshot  # pylint: disable=g-import-not-at-top
from evals.artifacts import Artifacts  # pylint: disable=g-import-not-at-top
from evals.predictor import Predictor  # pylint: disable=g-import-not-at-top
from klip import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from klip import host_memory  # pylint: disable=g-import-not-at-top
from klip import metrics_writer  # pylint: disable=g-import-not-at-top
from klip import provenance  # pylint: disable=g-import-not-at-top
from klip import sharding  # pylint: disable=g-import-not-at-top
from klip.data import caption as caption_lib  # pylint: disable=g-import-not-at-top
from klip.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top

ROOT = common.ROOT
BENCH = "learning"

COLUMNS = ("task", "zero-shot", "probe", "kNN", "pixel probe", "random-init probe",
           "supervised ceiling", "probe / ceiling", "chance", "n_train", "n_test")
KEYS = ("zeroshot", "probe", "knn", "pixel_probe", "random_probe", "ceiling",
        "probe_over_ceiling", "chance", "n_train", "n_test")


# ---------------------------------------------------------------------------------------------
# The run: its config, checkpoint, pretraining time; training it first (--variant).
# ---------------------------------------------------------------------------------------------
def latest_step(workdir: str) -> int:
  directory = os.path.join(workdir, "checkpoints")
  steps = checkpoint_lib.complete_steps(directory)
  if not steps:
    raise SystemExit(
        f"{workdir} has no finished checkpoint (looked in {directory}). Train it first: "
        f"python -m bench.learning --variant=tiny --workdir={workdir}, or python -m klip.train "
        f"--config=configs/pretrain.py:tiny --workdir={workdir}")
  return steps[-1]


def pretrain_seconds(workdir: str) -> tuple[float, str]:
  """Training time of the run without compilation, from metrics.jsonl (module docstring)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: cannot tell how long the pretraining took; "
                            "give --ceiling_seconds")
  rows = {r["step"]: r for r in metrics_writer.read(path)}  # the last row of a step counts
  known_s, known_steps, unknown_steps, prev = 0.0, 0, 0, 0
  for step in sorted(rows):
    rate = rows[step].get("perf/steps_per_s")
    if rate and rate > 0:
      known_s += (step - prev) / rate
      known_steps += step - prev
    else:
      unknown_steps += step - prev
    prev = step
  if not known_steps:
    raise ValueError(f"{path} has no perf/steps_per_s: give --ceiling_seconds")
  seconds = known_s + unknown_steps * known_s / known_steps
  return seconds, (f"{prev} steps from {os.path.basename(path)}: {known_steps} at their logged "
                   f"rates, {unknown_steps} at the mean step time")


def pretrain(variant: str, workdir: str, data_dir: str = "") -> float:
  """Trains `variant` into `workdir` with `python -m klip.train` (resuming an unfinished run),
  streaming its output; returns its wall seconds (0 when `workdir` holds a finished run: it is
  used as it is)."""
  from configs import pretrain as pretrain_configs  # pylint: disable=g-import-not-at-top
  config = pretrain_configs.get_config(variant)
  data_dir = data_dir or config.data.data_dir
  existing = os.path.join(workdir, "config.json")
  if os.path.exists(existing):
    recorded = provenance.read_config(workdir)
    if recorded.get("variant") != variant:
      raise SystemExit(f"{workdir} holds a {recorded.get('variant')!r} run, not {variant!r}: "
                       "use another --workdir")
    steps = checkpoint_lib.complete_steps(os.path.join(workdir, "checkpoints"))
    if steps and steps[-1] >= max(int(config.total_steps), int(recorded.total_steps)):
      # A finished run is evaluated as recorded: resuming it through the trainer would rebuild
      # the model from today's variant config, which may have changed since (it is refused
      # when a shape differs).
      log(f"pretraining: {workdir} holds a finished {variant} run (step {steps[-1]}); not "
          "starting the trainer")
      return 0.0
  for part in dataset_lib.parts(config.data.dataset):
    if part.startswith("synthetic/"):
      continue  # the trainer builds a missing embedded corpus itself
    try:
      dataset_lib.dataset_dir(os.path.join(ROOT, data_dir) if not os.path.isabs(data_dir)
                              else data_dir, part)
    except dataset_lib.DatasetMissingError:
      builder = part.partition("/")[0]
      source = {"mstar": "../shared/data/mstar/train",
                "opensarship": "../shared/data/opensarship"}.get(builder, "<the archive>")
      raise SystemExit(
          f"{variant} pretrains on {part}, which is not prepared under {data_dir}. Prepare it "
          f"first (from {ROOT}):\n  .venv/bin/python -m klip.data.prepare --dataset={builder} "
          f"--source={source} --data_dir={data_dir}") from None
  cmd = [sys.executable, "-m", "klip.train", f"--config=configs/pretrain.py:{variant}",
         f"--workdir={workdir}"]
  if data_dir != config.data.data_dir:
    cmd.append(f"--config.data.data_dir={data_dir}")
  env = dict(os.environ)
  env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  log(f"pretraining: {' '.join(shlex.quote(c) for c in cmd)}")
  start = time.time()
  with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
    for line in proc.stdout:
      print(f"  [train] {line}", end="", flush=True)
  if proc.returncode:
    raise SystemExit(f"pretraining failed (exit {proc.returncode}): {' '.join(cmd)}")
  seconds = time.time() - start
  log(f"pretraining process done in {seconds:.0f} s")
  return seconds


# ---------------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------------
def _mean(values: dict) -> float:
  return float(np.mean(list(values.values()))) if values else float("nan")


def _fmt(v) -> str:
  if isinstance(v, str):
    return v
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  if isinstance(v, int):
    return str(v)
  return f"{v:.3f}"


def format_table(rows: list[dict], pixel_factor: dict) -> str:
  cells = []
  for r in rows:
    if r.get("skipped"):
      cells.append([r["task"]] + ["-"] * (len(COLUMNS) - 1))
      continue
    values = [_fmt(r.get(k)) for k in KEYS]
    if pixel_factor.get(r["task"], 1) > 1 and values[3] != "-":
      values[3] += f" ({pixel_factor[r['task']]}x)"
    cells.append([r["task"]] + values)
  return common.table(cells, list(COLUMNS))


def run(workdir: str, *, variant: str = "", data_dir: str = "", step: int = 0,
        ceiling_seconds: float = -1.0, max_examples: int = 0, caption_examples: int = 64,
        batch_size: int = 64, source_root: str = "", prepare_workers: int = 1,
        fit: str = "held_out", results: str | None = common.RESULTS,
        out_dir: str | None = common.OUT_DIR, command: str | None = None) -> dict:
  """The whole benchmark; returns {'rows', 'captioning', 'seconds', ...} (and prints the
  table, appends RESULTS.md rows unless results is None)."""
  times = {}
  load_start = common.load()
  t = time.time()
  if variant:
    times["pretrain_process"] = pretrain(variant, workdir, data_dir)
  if not os.path.isdir(workdir):
    raise SystemExit(f"{workdir} does not exist: give --variant=tiny (or another) to train "
                     "it first")
  run_cfg = provenance.read_config(workdir)
  step = step or latest_step(workdir)
  if ceiling_seconds < 0:
    budget, budget_how = pretrain_seconds(workdir)
  else:
    budget, budget_how = ceiling_seconds, "--ceiling_seconds"
  log(f"{workdir}: {run_cfg.get('variant', '?')} run, evaluating step {step}; ceiling budget "
      f"{budget:.0f} s ({budget_how})")

  # ----- the pretrained model, the data
  mesh = sharding.make_mesh(dict(slice=1, data=-1, fsdp=1, tensor=1))
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in run_cfg.sharding_rules)
  t = time.time()
  pretrained = Predictor.restore(workdir, step, mesh=mesh, batch_size=batch_size)
  times["restore"] = time.time() - t
  ec = eval_configs.get_config(run_cfg.variant if run_cfg.get("variant") in
                               eval_configs.VARIANTS else "tiny")
  specs = ec.datasets  # a locked ConfigDict takes new values for its keys
  synthetic = [p for p in dataset_lib.parts(run_cfg.data.dataset) if p.startswith("synthetic/")]
  if synthetic:
    specs.synthetic.name = synthetic[0]
  data_dir = data_dir or run_cfg.data.data_dir
  datasets = data_lib.Datasets(specs, data_dir=data_dir,
                               source_root=source_root or ec.source_root, pretrain=run_cfg.data,
                               max_examples=max_examples, prepare_workers=prepare_workers)
  l2, epochs = ec.evals.probe_category.l2, ec.evals.probe_category.epochs
  k = ec.evals.knn_category.k
  t = time.time()
  tasks = tasks_lib.task_data(datasets, specs, run_cfg, data_dir, max_examples=max_examples,
                    ceiling=budget > 0, fit=fit)
  times["data"] = time.time() - t

  # ----- the pretrained and random-init models' features; the probes
  t = time.time()
  random_init = ceiling_lib.predictor_of(ceiling_lib.initial_model(run_cfg, mesh, rules),
                                         pretrained)
  rows, pixel_factor, pixels = [], {}, {}
  for td in tasks:
    row = {"task": td.task.name}
    rows.append(row)
    if td.skipped:
      row["skipped"] = td.skipped
      continue
    log(f"{td.task.name}: features, zero-shot, probes, kNN")
    fit_lab, test_lab = td.fit, td.test
    x_fit, x_test = fit_lab.pooled(pretrained), test_lab.pooled(pretrained)
    classes = sorted(frozenset().union(*fit_lab.sets, *test_lab.sets,
                                       zeroshot.VOCABULARIES.get(td.task.label, ())))
    class_prompts = [tasks_lib.prompts(td.task.label, c) for c in classes]
    if all(class_prompts):
      text = zeroshot.class_embeddings(pretrained.embed_texts, class_prompts)
      pred = np.argmax(test_lab.embedding(pretrained) @ text.T, axis=-1)
      row["zeroshot"] = tasks_lib.accuracy([classes[i] for i in pred], test_lab.sets)
    else:
      row["zeroshot"] = "n/a"
    row["probe"] = tasks_lib.probe_accuracy(x_fit, fit_lab.sets, x_test, test_lab.sets, l2=l2,
                                            epochs=epochs)
    row["knn"] = tasks_lib.knn_accuracy(x_fit, fit_lab.sets, x_test, test_lab.sets, k=k)
    p_fit, factor = tasks_lib.pixel_features(pretrained, fit_lab, pixels)
    p_test, _ = tasks_lib.pixel_features(pretrained, test_lab, pixels)
    pixel_factor[td.task.name] = factor
    row["pixel_probe"] = tasks_lib.probe_accuracy(p_fit, fit_lab.sets, p_test, test_lab.sets,
                                                  l2=l2, epochs=epochs)
    row["pixel_pool"] = factor
    row["random_probe"] = tasks_lib.probe_accuracy(
        fit_lab.pooled(random_init), fit_lab.sets, test_lab.pooled(random_init), test_lab.sets,
        l2=l2, epochs=epochs)
    row["chance"] = tasks_lib.chance(test_lab.sets)
    row["n_train"], row["n_test"] = len(fit_lab.sets), len(test_lab.sets)
    row["classes"] = len(classes)
  times["probes"] = time.time() - t

  # ----- captioning (the pretrained model)
  t = time.time()
  cap = {}
  try:
    log(f"captioning {caption_examples or 'all'} synthetic test chips")
    art_dir = os.path.join(workdir, "bench_learning")
    evaluator = captioning.Evaluator(pretrained, datasets, data="synthetic", split="test",
                                     beam_size=1, max_span=ec.evals.captioning.max_span,
                                     max_examples=caption_examples or None)
    metrics = dict(evaluator.run(Artifacts(art_dir, "captioning")))
    # the same-run reference: each field's most frequent value in the pretraining corpus
    captioned = datasets.split("synthetic", "test", max_examples=caption_examples or None)
    train = tasks_lib.read_split(data_dir, "synthetic", specs.synthetic.name, "train",
                                 max_examples)
    cap = {"repetition": metrics.get("repetition", float("nan")),
           "examples": int(metrics["num_examples"])}
    for key, prefix in (("field", ""), ("content", "content_")):  # exact text; what it says
      fields = {f: metrics[f"{key}/{f}"] for f in caption_lib.OBSERVABLE_FIELDS
                if f"{key}/{f}" in metrics}
      constant = dict(captioning.field_accuracy(
          captioning.constant_matches(train.records, captioned.records, key), key))
      constant = {f: constant[f"{key}/{f}"] for f in fields if f"{key}/{f}" in constant}
      cap.update({
          f"{prefix}fields": fields, f"{prefix}constant": constant,
          f"{prefix}observable_mean": _mean(fields), f"{prefix}constant_mean": _mean(constant)})
  except (dataset_lib.DatasetMissingError, ValueError) as e:
    cap = {"skipped": str(e).splitlines()[0]}
    log(f"captioning: skipped: {cap['skipped']}")
  times["captioning"] = time.time() - t

  # ----- the supervised ceiling
  ceiling = ceiling_lib.CeilingResult({})
  if budget > 0:
    t = time.time()
    log(f"supervised ceiling: {budget:.0f} s of training")
    ceiling = ceiling_lib.train_ceiling(run_cfg, mesh, rules, tasks, budget, pretrained)
    times["ceiling"] = time.time() - t
  for row in rows:
    if row.get("skipped"):
      continue
    c = ceiling.accuracy.get(row["task"], float("nan"))
    row["ceiling"] = c
    row["probe_over_ceiling"] = row["probe"] / c if c and math.isfinite(c) else float("nan")
  times["total"] = sum(v for k, v in times.items() if k != "pretrain_process")

  # ----- report
  info = {"variant": run_cfg.get("variant", "?"), "step": step,
          "commit": provenance.git_commit(), "run_commit": _run_commit(workdir), "fit": fit}
  table = format_table(rows, pixel_factor)
  lines = ["", f"Learning benchmark: {workdir} ({info['variant']}, step {step}; commit "
           f"{info['commit']}, run trained at {info['run_commit']}; probes fit on the {fit} "
           f"split; {common.machine()})", table]
  for row in rows:
    if row.get("skipped"):
      lines.append(f"  {row['task']}: skipped: {row['skipped']}")
  if budget > 0:
    lines.append(
        f"supervised ceiling: {ceiling.steps}/{ceiling.planned_steps} steps in "
        f"{ceiling.seconds:.0f} s (budget {budget:.0f} s: {budget_how}; compile "
        f"{ceiling.compile_seconds:.0f} s) on {ceiling.examples} chips of {ceiling.sources}")
  else:
    lines.append("supervised ceiling: skipped (--ceiling_seconds=0)")
  if pixel_factor and max(pixel_factor.values()) > 1:
    lines.append("pixel probe (2x): the input 2x2 average-pooled (more than "
                 f"{tasks_lib.PIXEL_LIMIT} values per image)")
  if "fields" in cap:
    lines.append(f"captioning ({cap['examples']} synthetic test chips, greedy; repetition "
                 f"{cap['repetition']:.3f}), observable fields right:")
    for prefix, what in (("content_", "in content (evals/captioning.py `content`)"),
                         ("", "word for word")):
      lines.append(f"  {what}: " + ", ".join(
          f"{k} {v:.3f}" for k, v in cap[f"{prefix}fields"].items())
          + f"; mean {cap[f'{prefix}observable_mean']:.3f}")
      lines.append("    the constant captioner (each field's most frequent train value): "
                   + ", ".join(f"{k} {v:.3f}" for k, v in cap[f"{prefix}constant"].items())
                   + f"; mean {cap[f'{prefix}constant_mean']:.3f}")
  elif cap:
    lines.append(f"captioning: skipped: {cap['skipped']}")
  lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  print("\n".join(lines), flush=True)

  out = {"rows": rows, "captioning": cap, "seconds": times, "ceiling": dataclasses.asdict(
      ceiling), "budget_seconds": budget, "budget_how": budget_how, **info, "table": table}
  if results:
    _record(results, rows, cap, times, info, ceiling, budget, load_start, command)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{BENCH}.json"), "w") as f:
      json.dump(out, f, indent=1, default=str)
  os.makedirs(os.path.join(workdir, "bench_learning"), exist_ok=True)
  with open(os.path.join(workdir, "bench_learning", "results.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  return out


def _run_commit(workdir: str) -> str:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      commit = json.load(f).get("git_commit", "unknown")
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")
  except (OSError, ValueError):
    return "unknown"


def _command() -> str:
  cmd = "python -m bench.learning " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  value = os.environ.get("GLIBC_TUNABLES", "").strip()
  return f"GLIBC_TUNABLES={shlex.quote(value)} {cmd}" if value else cmd


def _record(path, rows, cap, times, info, ceiling, budget, load_start, command) -> None:
  """One RESULTS.md row per task and one for captioning and timings (common.record's row)."""
  now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  machine = f"{common.machine()}; load {load_start:.1f}->{common.load():.1f}"
  head = f"variant={info['variant']}; step={info['step']}; commit={info['commit']}; " \
         f"run_commit={info['run_commit']}; fit={info['fit']}"
  command = command or _command()
  lines = []
  for row in rows:
    if row.get("skipped"):
      figs = f"{head}; skipped={row['skipped'].replace('|', '/')}"
    else:
      figs = head + "".join(f"; {k}={_fmt(row.get(k))}" for k in KEYS) + \
          f"; pixel_pool={row['pixel_pool']}; classes={row['classes']}"
    lines.append(f"| {now} | {BENCH}/{row['task']} | `{command}` | {machine} | {figs} |")
  figs = head
  if "fields" in cap:
    figs += "".join(f"; field_{k}={v:.3f}" for k, v in cap["fields"].items())
    figs += f"; observable_mean={cap['observable_mean']:.3f}; repetition=" \
            f"{_fmt(cap['repetition'])}; caption_examples={cap['examples']}; " \
            f"constant_mean={cap['constant_mean']:.3f}"
    figs += "".join(f"; content_{k}={v:.3f}" for k, v in cap["content_fields"].items())
    figs += f"; content_mean={cap['content_observable_mean']:.3f}; " \
            f"content_constant_mean={cap['content_constant_mean']:.3f}"
  elif cap:
    figs += f"; captioning_skipped={cap['skipped'].replace('|', '/')}"
  figs += f"; ceiling_steps={ceiling.steps}; ceiling_budget_s={budget:.0f}; " \
          f"ceiling_examples={ceiling.examples}"
  figs += "".join(f"; {k}_s={v:.0f}" for k, v in times.items())
  lines.append(f"| {now} | {BENCH}/captioning | `{command}` | {machine} | {figs} |")
  with open(path, "a") as f:
    f.write("\n".join(lines) + "\n")


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as the program: the test
  session imports klip.train and evals.run, whose --workdir and --step would clash.

  --data_dir is klip.data.prepare's flag (evals/data.py imports that module to prepare an
  archive on first use, and absl refuses a second definition): given, it names where the
  prepared datasets are; otherwise the run's config.data.data_dir counts.
  """
  from klip.data import prepare  # pylint: disable=g-import-not-at-top,unused-import
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_string("variant", "", "Train this configs/pretrain.py variant into --workdir "
                      "first (resuming what is there).")
  flags.DEFINE_integer("step", 0, "Checkpoint step (0: the latest finished one).")
  flags.DEFINE_float("ceiling_seconds", -1.0, "Supervised ceiling's training time (-1: as long "
                     "as the pretraining trained; 0: skip it).")
  flags.DEFINE_integer("max_examples", 0, "Cap on every split (0: all).")
  flags.DEFINE_integer("caption_examples", 64, "Synthetic test chips captioned (0: all).")
  flags.DEFINE_integer("batch_size", 64, "Examples per prediction call.")
  flags.DEFINE_string("source_root", "", "Real archives (default: the eval config's "
                      "../shared/data).")
  flags.DEFINE_integer("prepare_workers", 1, "Processes preparing a real archive on first use.")
  flags.DEFINE_enum("fit", "held_out", tasks_lib.FITS, "The probes' fit split: held_out (a "
                    "split the run did not pretrain on) or train (every task's train split).")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.workdir is None:
    raise app.UsageError("--workdir is required")
  if not f["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  if hint := host_memory.advice(jax.default_backend()):
    absl_logging.warning(hint)
  run(f.workdir, variant=f.variant, data_dir=f.data_dir if f["data_dir"].present else "",
      step=f.step, ceiling_seconds=f.ceiling_seconds, max_examples=f.max_examples,
      caption_examples=f.caption_examples, batch_size=f.batch_size, source_root=f.source_root,
      prepare_workers=f.prepare_workers, fit=f.fit)


if __name__ == "__main__":
  define_flags()
  app.run(main)
