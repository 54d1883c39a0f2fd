r"""B5: the input pipeline: examples/s from ArrayRecord through Grain with augmentation.

`klip.data.pipeline.local_batches` over the prepared corpus `synthetic/n4000_s64_c2_seed0`
exactly as the trainer opens it for the `tiny` config (training preprocessing: crop, gain
jitter, tokenization with value-span positions; SCIO's pair table applied; `data.num_threads`
threads, `data.num_workers` processes), alone, and relative to what the tiny train step
consumes (the step timed in the same run, interleaved; target: the pipeline at least 3x the
step). A per-stage profile of one example on one thread (ArrayRecord read + record decode, image
decode, SAR preprocessing, tokenization) shows where the pipeline's time goes.

  .venv/bin/python -m bench.b5_input
  .venv/bin/python -m bench.b5_input --rounds=1 --batches=10
"""

from __future__ import annotations

import argparse
import os
import time

from bench import common

import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order

TARGET = 3.0


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batches", type=int, default=30, help="batches timed per round")
  p.add_argument("--steps", type=int, default=10, help="train steps timed per round")
  p.add_argument("--profile_examples", type=int, default=200)
  p.add_argument("--data_dir", default=os.path.join(common.ROOT, "data"))
  p.add_argument("--workdir", default=os.path.join(common.ROOT, "workdirs", "bench"))
  args = p.parse_args(argv)
  load_start = common.load()
  log = common.log
  from bench import b3_scio  # pylint: disable=g-import-not-at-top
  from klip import train  # pylint: disable=g-import-not-at-top
  from klip.data import pipeline, schema  # pylint: disable=g-import-not-at-top
  from klip.scio import table as table_lib  # pylint: disable=g-import-not-at-top

  config = common.variant_config("tiny", **{"data.data_dir": args.data_dir})
  d = config.data
  log(f"B5 input pipeline, tiny ({d.dataset}); {common.machine()}; {common.versions()}")
  source = train._source(d)  # pylint: disable=protected-access
  tok = b3_scio.tokenizer(config, args.workdir, source)
  table = table_lib.PairTable.initial(f"{d.dataset}:{d.split}", table_lib.read_id_hashes(source))
  preprocess = pipeline.Preprocess(
      tokenizer_path=tok.path, image_size=config.model.image_size,
      channels=config.model.channels, max_len=config.model.text.max_len, db_min=d.db_min,
      db_max=d.db_max, train=True, gain_db=d.gain_db, table=table.view())
  b = config.batch_size
  state = {"start": 0}

  def pipeline_rate():
    # A fresh iterator per round at a new stream position, as a resumed run opens one; its
    # first batch (thread start-up, prefetch) is not timed.
    it = pipeline.local_batches(source, preprocess, seed=config.seed, global_batch=b,
                                start_example=state["start"], num_workers=d.num_workers,
                                num_threads=d.num_threads, name=d.dataset)
    next(it)
    t = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    state["start"] += (args.batches + 1) * b
    return args.batches * b / (time.perf_counter() - t)

  ps = common.ProjectStep(config)
  ps.compile()
  ps.run(2)
  calib = common.MatmulCalibration()
  tasks = {"xla_matmul": calib.measure, "pipeline": pipeline_rate,
           "step": lambda: b / common.median(ps.run(args.steps))}
  rates = common.interleave(tasks, args.rounds, log=log)

  # Per-stage profile, one thread, no Grain.
  stages = {"read+decode record": 0.0, "image decode (PNG)": 0.0, "SAR preprocess": 0.0,
            "tokenize caption": 0.0}
  rng = np.random.default_rng(0)
  n = args.profile_examples
  idx = rng.integers(0, len(source), n)
  tok_obj = preprocess._tokenizer()  # pylint: disable=protected-access
  view = table.view()
  for i in idx:
    t0 = time.perf_counter()
    record = source[int(i)]
    t1 = time.perf_counter()
    db = schema.decode_image(record)
    t2 = time.perf_counter()
    preprocess.image(db, rng)
    t3 = time.perf_counter()
    st, skip, _ = view.apply(int(i), schema.example_id(record), schema.structured_text(record))
    tok_obj.encode_caption(st, config.model.text.max_len, skip=skip)
    t4 = time.perf_counter()
    for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
      stages[k] += v
  per_example = sum(stages.values()) / n

  ratio = common.ratios(rates["pipeline"], rates["step"])
  figures = {"pipeline_examples_s": common.median(rates["pipeline"]),
             "step_examples_s": common.median(rates["step"]),
             "pipeline_over_step": common.median(ratio),
             "single_thread_examples_s": 1.0 / per_example}
  log("")
  log(f"B5 input pipeline (tiny: batch {b}, {d.num_threads} threads, {d.num_workers} worker "
      f"processes; {args.rounds} interleaved rounds of {args.batches} batches; load "
      f"{load_start:.1f}->{common.load():.1f})")
  log(common.table([
      ["Grain pipeline alone", common.median(rates["pipeline"]), max(rates["pipeline"])],
      ["tiny train step consumes", common.median(rates["step"]), max(rates["step"])],
      ["pipeline / step", common.median(ratio),
       f"target >= {TARGET:.0f}x: {'met' if common.median(ratio) >= TARGET else 'MISSED'}"],
  ], ["", "examples/s (median)", "best / target"]))
  log(f"\none example on one thread, no Grain ({n} examples): {per_example * 1e3:.2f} ms "
      f"= {1 / per_example:.0f} examples/s")
  log(common.table([[k, v / n * 1e3, f"{v / n / per_example:.0%}"] for k, v in stages.items()],
                   ["stage", "ms/example", "share"]))
  common.record("b5", figures, load_start=load_start, note=f"{args.rounds} rounds")
  return {"rates": rates, "figures": figures, "stages": stages}


if __name__ == "__main__":
  main()
