r"""Measured SCIO quality on the synthetic corpus, whose captions' true values are known.

Plants wrong values in a fraction of the clauses of pixel-observable fields (each such clause
independently, swapping in a value of the same field from another record of the same family
that says something else, `klip/data/content.py`) through the initial pair table, pretrains
twice on the planted captions (with SCIO, and without: no pass ever runs), and prints per field
and overall, on the pairs SCIO rescored: screening precision / recall / F1 against the planted
errors (a clause counts as flagged if the final table drops it or SCIO rewrote it),
reconstruction accuracy of SCIO's rewrites (right when the rewrite says what the true value
says, `content`), SCIO's cost per rescored pair and share of wall time, and retrieval recall on
the test split with and without SCIO, and how often the final SCIO model scores a caption above
the same caption with one planted value on its own image (per field; the ceiling any screening
rule on those scores works under; bench/scio_quality.py). The run without SCIO starts from the
SCIO run's checkpoint at the last warm-up step (`--fork_baseline`, on by default): the two runs
are the same computation up to there, so only what follows differs.

  # tiny, shortened: two 150-step runs, about 12 minutes on 2 cores (seen on a loaded machine;
  # corpus: configs/pretrain.py's docstring)
  python -m bench.scio --variant=tiny --steps=150 --out_dir=workdirs/bench_scio_tiny
  # the benchmark as specified: small variant (400 steps: 28 min with SCIO, then 17 min for the
  # run without it, forked at the end of the warm-up; 2026-11-28, idle 2 cores)
  python -m bench.scio --steps=400 --out_dir=workdirs/bench_scio_small
  # screening with and without clause-swap negatives in the matching loss, SCIO runs only
  python -m bench.scio --variant=tiny --clause_negatives=true --nobaseline --out_dir=...
  # the clause screen flagging more of each field's clean clauses (default 2 %)
  python -m bench.scio --variant=tiny --screen=clause --false_flag_rate=0.1 --nobaseline ...
  # reconstruction with the field's 8 most frequent other values ranked beside the decoder's fill
  python -m bench.scio --variant=tiny --steps=400 --fill_candidates=8 --nobaseline --out_dir=...
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging as absl_logging

from bench import scio_quality as quality
from configs import pretrain
from klip import checkpoint as checkpoint_lib
from klip import metrics_writer
from klip import train
from klip.scio import table as table_lib


_VARIANT = flags.DEFINE_string("variant", "small", "Config variant to pretrain.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: the variant's total_steps).")
_RATE = flags.DEFINE_float("rate", 0.15, "Fraction of pixel-observable clauses planted wrong.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Where the prepared corpus lives.")
_OUT_DIR = flags.DEFINE_string("out_dir", "workdirs/bench_scio", "Runs and report go here.")
_SEED = flags.DEFINE_integer("seed", 0, "Planting seed.")
_EVERY = flags.DEFINE_integer("every_steps", 0, "SCIO period (0: the variant's).")
_SLICE = flags.DEFINE_integer("slice_size", -1, "Pairs per pass (-1: the variant's; 0: all).")
_BASELINE = flags.DEFINE_boolean("baseline", True,
                                 "Also train without SCIO (the retrieval comparison).")
_FORK = flags.DEFINE_boolean(
    "fork_baseline", True,
    "Start the run without SCIO from the SCIO run's checkpoint at the last warm-up step (the "
    "two runs are the same computation up to there) instead of training it from scratch.")
_CANDIDATES = flags.DEFINE_integer(
    "fill_candidates", -1, "scio.fill_candidates: the field's most frequent other values ranked "
    "with the decoder's fill in the reconstruct stage (-1: the variant's).")
_SWAP = flags.DEFINE_enum("clause_negatives", "default", ["default", "true", "false"],
                          "loss.clause_negatives of both runs (default: the variant's).")
_SCREEN = flags.DEFINE_enum("screen", "default", ["default", "leave_one_out", "clause"],
                            "scio.screen of the SCIO run (default: the variant's).")
_FALSE_FLAGS = flags.DEFINE_float(
    "false_flag_rate", -1.0, "scio.false_flag_rate: the share of a field's clean clauses the "
    "calibrated margins flag (-1: the variant's).")


def _fork_from(src: str, dst: str, step: int) -> None:
  """Copies run `src` to `dst` without its checkpoints after `step`, so that `dst` resumes
  from there (the metrics writer drops the rows after it)."""
  shutil.copytree(src, dst)
  ckpt_dir = os.path.join(dst, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  if step not in steps:
    raise RuntimeError(f"{src} has no checkpoint at the fork step {step} (has {steps})")
  for s in steps:
    if s > step:
      shutil.rmtree(os.path.join(ckpt_dir, str(s)))
  shutil.rmtree(os.path.join(dst, "eval"), ignore_errors=True)
  print(f"run without SCIO: forked from {src} at step {step}", flush=True)


def run(variant: str, steps: int, rate: float, data_dir: str, workdir: str, seed: int,
        every_steps: int, slice_size: int, clause_negatives: str = "default",
        baseline: bool = True, fork_baseline: bool = True, fill_candidates: int = -1,
        screen: str = "default", false_flag_rate: float = -1.0) -> str:
  base = pretrain.get_config(variant)
  texts, ids = quality.captions(data_dir, base.data.dataset, base.data.split)
  initial, planted = quality.plant(texts, ids, f"{base.data.dataset}:{base.data.split}", rate,
                                   seed)
  os.makedirs(workdir, exist_ok=True)
  table_path = os.path.join(workdir, "planted_table.json")
  with open(table_path, "w") as f:
    json.dump(initial.to_json(), f)
  results = {}
  for name, scio_on in (("scio", True), ("no_scio", False))[:1 if not baseline else 2]:
    run_dir = os.path.join(workdir, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    config = pretrain.get_config(variant)
    config.unlock()
    config.data.data_dir = data_dir
    config.total_steps = steps or config.total_steps
    config.checkpoint.every_steps = config.total_steps
    config.scio.update(enabled=True, initial_table=table_path)
    config.scio.every_steps = every_steps or config.scio.every_steps
    config.scio.slice_size = config.scio.slice_size if slice_size < 0 else slice_size
    if clause_negatives != "default":
      config.loss.clause_negatives = clause_negatives == "true"
    if fill_candidates >= 0:
      config.scio.fill_candidates = fill_candidates
    if screen != "default":
      config.scio.screen = screen
    if false_flag_rate >= 0:
      config.scio.false_flag_rate = false_flag_rate
    fork = math.ceil(config.scio.warmup_fraction * config.total_steps) - 1  # last warm-up step
    fork = fork if fork_baseline and baseline and fork > 0 else 0
    if fork and scio_on:  # keep a checkpoint at the fork for the run without SCIO
      config.checkpoint.update(every_steps=fork, keep=config.total_steps // fork + 2)
    if not scio_on:  # the planted captions, but no pass ever runs
      config.scio.warmup_fraction = 2.0
    config.lock()
    if fork and not scio_on:
      _fork_from(results["scio"][1], run_dir, fork)
    summary = train.train(config, run_dir)
    results[name] = (config, run_dir, summary)
  config, run_dir, summary = results["scio"]
  ckpt = checkpoint_lib.Checkpointer(run_dir, keep=1, async_save=False)
  saved = table_lib.Tables.from_parts(*ckpt.restore_table(ckpt.latest_step()))
  ckpt.close()
  final = saved.pending if saved.pending is not None else saved.active
  counts = quality.screening(final, initial, texts, planted)
  rows = [r for r in metrics_writer.read(os.path.join(run_dir, "metrics.jsonl"))
          if "scio/pass_seconds" in r]
  pass_seconds = sum(r["scio/pass_seconds"] for r in rows)
  rescored = sum(r["scio/rescored"] for r in rows)
  header = (f"{'field':<14}{'planted':>8}{'flagged':>8}{'precision':>10}{'recall':>8}{'F1':>8}"
            f"{'rewrites':>9}{'right':>10}")
  lines = [f"SCIO benchmark: variant={variant}, steps={config.total_steps}, planted rate "
           f"{rate:.0%} of pixel-observable clauses ({len(planted)} clauses in "
           f"{len({i for i, _ in planted})} of {len(texts)} pairs); clause negatives "
           f"{'on' if config.loss.clause_negatives else 'off'}; screen {config.scio.screen}, "
           f"false-flag rate {config.scio.false_flag_rate:g}"
           + (f" ({config.scio.screen_candidates} rivals a clause)"
              if config.scio.screen == "clause" else
              f"; reconstruction candidates {config.scio.fill_candidates}"),
           f"pairs rescored (at least once): {int(np.sum(final.scored_version >= 0))}; "
           f"passes: {len(rows)}", header, "-" * len(header)]
  total = quality.Counts()
  for name in sorted(counts):
    lines.append(counts[name].row(name))
    total.add(counts[name])
  lines += ["-" * len(header), total.row("overall"), "",
            f"SCIO cost: {pass_seconds:.1f} s over {int(rescored)} rescored pairs "
            f"({1e3 * pass_seconds / max(rescored, 1):.1f} ms/pair); "
            f"{pass_seconds / summary['wall_seconds']:.1%} of the run's "
            f"{summary['wall_seconds']:.0f} s wall time", "",
            f"{'retrieval (test)':<18}{'i2t R@1':>9}{'i2t R@5':>9}{'t2i R@1':>9}{'t2i R@5':>9}"]
  for name in results:
    config, run_dir, _ = results[name]
    r = quality.retrieval(config, run_dir, data_dir)
    lines.append(f"{name:<18}{r['i2t_R@1']:>9.3f}{r['i2t_R@5']:>9.3f}{r['t2i_R@1']:>9.3f}"
                 f"{r['t2i_R@5']:>9.3f}")
  config, run_dir, _ = results["scio"]
  test_texts, test_ids = quality.captions(data_dir, base.data.dataset, "test")
  test_initial, test_planted = quality.plant(test_texts, test_ids,
                                             f"{base.data.dataset}:test", rate, seed)
  ceiling = {
      "train": quality.discrimination(config, run_dir, data_dir, texts, initial, planted,
                                      limit=640, seed=seed),
      "test": quality.discrimination(config, run_dir, data_dir, test_texts, test_initial,
                                     test_planted, limit=640, seed=seed, split="test")}
  lines += ["", "what the final SCIO model tells apart: a caption against the same caption with "
            "one planted value, on its own image",
            "(fraction scored higher, 0.5 is chance; train: the pairs it trained on, planted "
            "values and all, where screening works; test: unseen pairs; whole: the caption, "
            "what the leave-one-out screen compares; clause: the clause alone, what the clause "
            "screen compares)",
            f"{'field':<14}" + "".join(f"{f'{s} pairs':>12}{'whole cos':>10}{'match':>8}"
                                        f"{'clause cos':>11}{'match':>8}" for s in ceiling)]
  fields = sorted(set(ceiling["train"]) | set(ceiling["test"]))
  for name in fields + ["overall"]:
    line = f"{name:<14}"
    for split in ceiling:
      rows = (np.concatenate(list(ceiling[split].values())) if name == "overall"
              else ceiling[split].get(name, np.zeros((0, 4), bool)))
      mean = rows.mean(0) if len(rows) else np.full(4, np.nan)
      line += f"{len(rows):>12}{mean[0]:>10.3f}{mean[1]:>8.3f}{mean[2]:>11.3f}{mean[3]:>8.3f}"
    lines.append(line)
  return "\n".join(lines)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
  report = run(_VARIANT.value, _STEPS.value, _RATE.value, _DATA_DIR.value, _OUT_DIR.value,
               _SEED.value, _EVERY.value, _SLICE.value, _SWAP.value, _BASELINE.value,
               _FORK.value, _CANDIDATES.value, _SCREEN.value, _FALSE_FLAGS.value)
  with open(os.path.join(_OUT_DIR.value, "report.txt"), "w") as f:
    f.write(report + "\n")
  print(report, flush=True)


if __name__ == "__main__":
  app.run(main)
