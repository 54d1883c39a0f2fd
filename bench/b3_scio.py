r"""B3: the SCIO rescoring pass: pairs/s and its share of training wall time (tiny config).

The pass is the trainer's (`klip.scio.rescore.run_pass` with `ModelScorer`, the
`klip.inference` harness over the train state, on the prepared corpus
`synthetic/n4000_s64_c2_seed0`, records read and tokenized on the host): `scio.slice_size` pairs (64) in chunks of `scio.batch_size`, each pair scored with its
full caption and, by `scio.screen` (`--screen`, default the config's): its 8 leave-one-clause-
out variants, or its 5 observable clauses alone each with `scio.screen_candidates` rivals
(`klip/scio/clauses.py`). Measured, interleaved with the tiny train step:

  proofread     a pass in the screen + proofread stage (scores only);
  reconstruct   a pass in the last stage (refills the clauses flagged; with a freshly
                initialised model few or none are flagged, so also:)
  fill (all)    `ModelScorer.fill` refilling one clause of every pair of a chunk (the worst case
                of the reconstruct stage: greedy decoding of up to `scio.max_span` tokens).

The share of wall time at the default period (`scio.every_steps` = 50) is pass / (50 steps +
pass) while SCIO is active, and over a whole default run (`total_steps` 400: passes after the
warm-up third, the last third reconstructing). Host time (reading, decoding and tokenizing the
texts of each pair) is split from device time (the jitted scoring).

  .venv/bin/python -m bench.b3_scio
  .venv/bin/python -m bench.b3_scio --rounds=1 --screen=leave_one_out
"""

from __future__ import annotations

import argparse
import functools
import os
import time

from bench import common
from bench import flops as flops_lib

import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order


def tokenizer(config, workdir: str, source):
  """The run's tokenizer via the trainer (copied from workdirs/tiny when there is one, else
  trained on the corpus, a few seconds)."""
  from klip import train  # pylint: disable=g-import-not-at-top
  existing = os.path.join(common.ROOT, "workdirs", "tiny", "tokenizer.model")
  if os.path.exists(existing) and not config.tokenizer.path:
    config.unlock()
    config.tokenizer.path = existing
    config.lock()
  os.makedirs(workdir, exist_ok=True)
  return train._tokenizer(config, workdir, source)  # pylint: disable=protected-access


class Timed:
  """Wraps a function; accumulates its wall time."""

  def __init__(self, fn):
    self.fn, self.seconds, self.calls = fn, 0.0, 0

  def __call__(self, *a, **kw):
    t = time.perf_counter()
    try:
      return self.fn(*a, **kw)
    finally:
      self.seconds += time.perf_counter() - t
      self.calls += 1


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10, help="tiny train steps timed per round")
  p.add_argument("--data_dir", default=os.path.join(common.ROOT, "data"))
  p.add_argument("--workdir", default=os.path.join(common.ROOT, "workdirs", "bench"))
  p.add_argument("--screen", choices=("leave_one_out", "clause"), default=None,
                 help="scio.screen (default: the tiny config's)")
  args = p.parse_args(argv)
  load_start = common.load()
  log = common.log
  from klip import train  # pylint: disable=g-import-not-at-top
  from klip.data import pipeline  # pylint: disable=g-import-not-at-top
  from klip import inference  # pylint: disable=g-import-not-at-top
  from klip.scio import rescore  # pylint: disable=g-import-not-at-top
  from klip.scio import table as table_lib  # pylint: disable=g-import-not-at-top

  config = common.variant_config("tiny", **{"data.data_dir": args.data_dir,
                                            **({"scio.screen": args.screen} if args.screen
                                               else {})})
  d, s = config.data, config.scio
  by_clause = s.screen == "clause"
  clause_len = config.loss.clause_max_len
  log(f"B3 SCIO pass, tiny; {common.machine()}; {common.versions()}")
  source = train._source(d)  # pylint: disable=protected-access
  tok = tokenizer(config, args.workdir, source)
  ps = common.ProjectStep(config)
  ps.compile()
  ps.run(2)
  harness = inference.Inference(ps.graphdef, ps.shardings, ps.mesh, ps.rules,
                                model_of=lambda merged: merged.model,
                                compiler_options=inference.scoring_options(ps.mesh))
  # the train state of the latest step (ps.run donates the old one)
  scorer = lambda: rescore.ModelScorer(harness, ps.state, max_span=s.max_span)
  preprocess = pipeline.Preprocess(
      tokenizer_path=tok.path, image_size=config.model.image_size,
      channels=config.model.channels, max_len=config.model.text.max_len, db_min=d.db_min,
      db_max=d.db_max, train=False, gain_db=d.gain_db)
  t = time.perf_counter()
  table = table_lib.PairTable.initial(f"{d.dataset}:{d.split}", table_lib.read_id_hashes(source))
  log(f"pair table of {len(table)} rows read in {time.perf_counter() - t:.1f} s")
  max_len = config.model.text.max_len
  from klip.data import values as values_lib  # pylint: disable=g-import-not-at-top
  from klip.scio import clauses  # pylint: disable=g-import-not-at-top
  pool = values_lib.ValuePool.from_source(source) if by_clause else None

  # One chunk's inputs, for the forced fill and the FLOP count.
  rows = np.arange(s.batch_size)
  images, ids, clause, texts, options = [], [], [], [], []
  from klip.data import schema  # pylint: disable=g-import-not-at-top
  for i in rows:
    record = source[int(i)]
    images.append(preprocess.random_map((int(i), record), None)["image"])
    st = schema.structured_text(record)
    a, c, v = rescore.caption_texts(tok, st, max_len)
    ids.append(a)
    clause.append(c)
    texts.append(v)
    if by_clause:
      options.append(clauses.options(tok, st, pool, s.screen_candidates, clause_len)[0])
  images, ids, clause, texts = map(np.stack, (images, ids, clause, texts))
  # what one chunk scores: (texts [n, V, L]) per scoring call
  scored = [texts[:, :1], np.stack(options)] if by_clause else [texts]
  k_all = np.zeros(len(rows), np.int32)  # refill clause 0 of every pair

  counters = {}

  def one_pass(stage):
    score = Timed(scorer().score)
    fill = Timed(scorer().fill)
    t = time.perf_counter()
    with ps._ctx():  # pylint: disable=protected-access
      _, result = rescore.run_pass(table, source, preprocess, tok, score, fill, stage=stage,
                                   cfg=s, max_len=max_len, pool=pool, clause_len=clause_len)
    wall = time.perf_counter() - t
    counters[stage.name] = dict(score_s=score.seconds, fill_s=fill.seconds, wall=wall,
                                flagged=int(np.sum(result.flagged >= 0)),
                                rows=len(result.rows))
    return len(result.rows) / wall

  def forced_fill():
    t = time.perf_counter()
    with ps._ctx():  # pylint: disable=protected-access
      scorer().fill(images, ids, clause, k_all)
    return len(rows) / (time.perf_counter() - t)

  xla, analytic = {"matmul": 0.0}, 0.0
  for t in scored:
    with ps._ctx():  # pylint: disable=protected-access
      compiled = harness.jitted(inference.variant_scores, 4, 3).lower(
          ps.state, images, t).compile()
    xla["matmul"] += flops_lib.compiled_flops(compiled)["matmul"]
    analytic += flops_lib.scio_scores(config.model, len(rows), t.shape[1],
                                      length=t.shape[2]).forward_total
  log(f"scoring chunk of {len(rows)} pairs ({s.screen} screen: "
      f"{' + '.join(f'{t.shape[1]} x {t.shape[2]}' for t in scored)} texts x tokens): matmul "
      f"GFLOP XLA {xla['matmul'] / 1e9:.2f}, analytic {analytic / 1e9:.2f}")
  one_pass(rescore.Stage.PROOFREAD)  # compiles the scorer
  forced_fill()  # compiles generation
  calib = common.MatmulCalibration()
  tasks = {"xla_matmul": calib.measure,
           "step": lambda: config.batch_size / common.median(ps.run(args.steps)),
           "proofread": functools.partial(one_pass, rescore.Stage.PROOFREAD),
           "reconstruct": functools.partial(one_pass, rescore.Stage.RECONSTRUCT),
           "fill_all": forced_fill}
  rates = common.interleave(tasks, args.rounds, log=log)

  step_s = [config.batch_size / r for r in rates["step"]]
  every, total = s.every_steps, config.total_steps
  mm = rates["xla_matmul"]
  rows_out, figures = [], {}
  pass_pairs = len(rescore.pass_rows(0, len(table), s.slice_size))
  for name in ("proofread", "reconstruct", "fill_all"):
    pr = rates[name]
    seconds = [pass_pairs / r for r in pr]
    steady = common.median([x / (every * st + x) for x, st in zip(seconds, step_s)])
    row = [name, common.median(pr), common.median(seconds), f"{steady:.1%}"]
    if name == "proofread":
      per_pair = xla["matmul"] / len(rows)
      achieved = [r * per_pair for r in pr]
      c = counters["PROOFREAD"]
      row += [per_pair / 1e9, common.median(achieved) / 1e9,
              f"{common.median(common.ratios(achieved, mm)):.1%}",
              f"{c['score_s'] / c['wall']:.0%}"]
      figures["score_gflop_pair"] = per_pair / 1e9
    elif name == "reconstruct":
      c = counters["RECONSTRUCT"]
      row += ["", "", "", f"{(c['score_s'] + c['fill_s']) / c['wall']:.0%} "
              f"({c['flagged']} flagged)"]
    else:
      row += ["", "", "", "100%"]
    rows_out.append(row)
    figures[f"{name}_pairs_s"] = common.median(pr)
    figures[f"{name}_share_steady"] = steady
  # A whole default run: passes at multiples of every_steps after the warm-up third.
  from klip.scio import schedule  # pylint: disable=g-import-not-at-top
  stages = [schedule.stage_at(st, total, s) for st in range(every, total + 1, every)]
  n_proof = sum(1 for x in stages if x == rescore.Stage.PROOFREAD)
  n_recon = sum(1 for x in stages if x == rescore.Stage.RECONSTRUCT)
  proof_s = common.median([pass_pairs / r for r in rates["proofread"]])
  recon_s = common.median([pass_pairs / r for r in rates["reconstruct"]])
  train_s = total * common.median(step_s)
  run_share = (n_proof * proof_s + n_recon * recon_s) / (train_s + n_proof * proof_s
                                                         + n_recon * recon_s)
  flagged = counters["RECONSTRUCT"]["flagged"] / max(counters["RECONSTRUCT"]["rows"], 1)
  figures.update(screen=s.screen, step_pairs_s=common.median(rates["step"]),
                 run_share=run_share, passes=f"{n_proof}+{n_recon}",
                 reconstruct_flagged=flagged)
  log("")
  log(f"B3 SCIO pass (tiny: {pass_pairs} pairs per pass, {s.screen} screen, "
      f"{' + '.join(str(t.shape[1]) for t in scored)} texts each, period {every} steps; "
      f"{args.rounds} interleaved rounds; tiny train step {common.median(rates['step']):.1f} "
      f"pairs/s = {common.median(step_s):.2f} s/step; same-run XLA f32 matmul "
      f"{common.median(mm) / 1e9:.0f} GFLOP/s; load {load_start:.1f}->{common.load():.1f})")
  log(common.table(rows_out, ["pass", "pairs/s", "s/pass", "share @50", "GFLOP/pair",
                              "GFLOP/s", "of XLA mm", "device share"]))
  log(f"\nwhole default run ({total} steps; {n_proof} proofread + {n_recon} reconstruct passes):"
      f" SCIO {run_share:.1%} of wall time (reconstruct passes as measured here, with "
      f"{flagged:.0%} of the pairs flagged by this freshly initialised model; fill_all: "
      "refilling one clause of every pair, generation alone)")
  log(f"scoring FLOPs per chunk: XLA {xla['matmul'] / 1e9:.2f} G, analytic "
      f"{analytic / 1e9:.2f} G ({xla['matmul'] / analytic - 1:+.2%})")
  common.record("b3", figures, load_start=load_start, note=f"{args.rounds} rounds")
  return {"rates": rates, "figures": figures, "counters": counters}


if __name__ == "__main__":
  main()
