r"""The SCIO pair table at scale: its size and the costs that grow with the number of pairs.

A rescoring pass reads and scores `scio.slice_size` pairs whatever the table's size (B3 measures
that); what grows with the number of pairs N is the table itself: the id read at the start of a
run (every record once, split between the processes), the checkpoint's save and restore of
both tables (active and pending), the pass's copy of the table (`_Outcomes.applied`) and the
view handed to the input pipeline (`PairTable.view`, pickled to each Grain worker). This script
builds a table of N rows (fabricated ids, a few percent of rows dropped and rewritten, as after
passes), and times each of those, with the size of the table as the checkpoint stores it
(columns as arrays sharded by rows, the rest as JSON) and as one JSON document (the layout of
schema 1, in every checkpoint until the columns became arrays).

With `--data_dir` (a directory where tiny's corpus is prepared) it also times the id read on
real records, the one cost of a run's start that grows with N: each of P processes reads N / P
records (`klip.scio.schedule.read_id_hashes`).

  .venv/bin/python -m bench.scio_table --data_dir=data         # N = 10k, 100k, 1M
  .venv/bin/python -m bench.scio_table --rows=10000 --workdir=/tmp/scio_table
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
import time

import numpy as np

from bench import common


def table_of(n: int, seed: int = 0):
  """A table of n rows as it looks after some passes: 3 % dropped, 1 % rewritten."""
  from klip.scio import table as table_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  table = table_lib.PairTable.initial(
      "synthetic/n1000000_s224_c2_seed0:train",
      np.fromiter((table_lib.id_hash(f"synthetic-{seed}-{i:08d}") for i in range(n)),
                  np.uint32, count=n))
  table.version = 7
  dropped = rng.random(n) < 0.03
  table.dropped[dropped] = rng.integers(0, 8, dropped.sum())
  table.weight[:] = rng.uniform(0.5, 1.0, n)
  table.scores[:] = rng.normal(size=table.scores.shape)
  table.scored_version[:] = rng.integers(-1, 8, n)
  for i in np.flatnonzero(rng.random(n) < 0.01):
    table.rewrites[int(i)] = {int(rng.integers(8)): "a moderately busy harbour"}
  return table


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(n: int, workdir: str) -> dict:
  """Figures of one table size: bytes and seconds (see the module docstring)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from klip import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from klip.scio import table as table_lib  # pylint: disable=g-import-not-at-top
  table = table_of(n)
  tables = table_lib.Tables(table, table.copy(), 0)
  state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  shutil.rmtree(workdir, ignore_errors=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=2, async_save=False)
  t = time.perf_counter()
  ckpt.save(1, state, {"step": 1}, tables=tables)
  ckpt.wait()
  save_s = time.perf_counter() - t
  step_dir = os.path.join(ckpt.directory, "1")
  t = time.perf_counter()
  back = table_lib.Tables.from_parts(*ckpt.restore_table(1))
  restore_s = time.perf_counter() - t
  ckpt.close()
  assert len(back.active) == n and back.active.rewrites == table.rewrites
  t = time.perf_counter()
  table.copy()
  copy_s = time.perf_counter() - t
  t = time.perf_counter()
  view = pickle.dumps(table.view())
  view_s = time.perf_counter() - t
  t = time.perf_counter()
  as_json = json.dumps({"active": table.to_json(), "pending": table.to_json()})
  json_s = time.perf_counter() - t
  return {"rows": n, "arrays_mb": _du(os.path.join(step_dir, "scio_rows")) / 1e6,
          "meta_mb": _du(os.path.join(step_dir, "scio")) / 1e6,
          "one_json_mb": len(as_json) / 1e6, "save_s": save_s, "restore_s": restore_s,
          "copy_s": copy_s, "view_pickle_mb": len(view) / 1e6, "view_s": view_s,
          "json_encode_s": json_s}


def id_read_rate(data_dir: str) -> tuple[int, float]:
  """(records, seconds) of reading the id hash of every record of tiny's prepared corpus."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from klip.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from klip.scio import table as table_lib  # pylint: disable=g-import-not-at-top
  d = pretrain.get_config("tiny").data
  source = dataset_lib.source(data_dir, d.dataset, d.split)
  t = time.perf_counter()
  table_lib.read_id_hashes(source)
  return len(source), time.perf_counter() - t


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="10000,100000,1000000",
                      help="Table sizes, comma-separated.")
  parser.add_argument("--data_dir", default="", help="Where tiny's corpus is prepared: also "
                      "time the id read on its records.")
  parser.add_argument("--workdir", default="", help="Scratch directory (default: a temporary "
                      "one, removed at the end).")
  args = parser.parse_args()
  load_start = common.load()
  scratch = args.workdir or tempfile.mkdtemp(prefix="scio_table_")
  common.log(f"SCIO pair table at scale; {common.machine()}; {common.versions()}")
  rows, figures = [], {}
  try:
    for n in (int(x) for x in args.rows.split(",")):
      f = measure(n, os.path.join(scratch, str(n)))
      common.log(f"{n} rows measured")
      rows.append([f"{n:,}", f"{f['arrays_mb']:.1f}", f"{f['meta_mb']:.2f}",
                   f"{f['one_json_mb']:.1f}", f"{f['save_s']:.2f}", f"{f['restore_s']:.2f}",
                   f"{f['copy_s'] * 1e3:.1f}", f"{f['view_pickle_mb']:.1f}",
                   f"{f['view_s'] * 1e3:.1f}", f"{f['json_encode_s']:.2f}"])
      figures.update({f"n{n}_{k}": v for k, v in f.items() if k != "rows"})
  finally:
    if not args.workdir:
      shutil.rmtree(scratch, ignore_errors=True)
  print(common.table(rows, ["pairs", "arrays MB", "JSON part MB", "as one JSON MB", "save s",
                            "restore s", "copy ms", "view pickle MB", "view ms",
                            "one JSON encode s"]))
  if args.data_dir:
    n, seconds = id_read_rate(args.data_dir)
    figures.update(id_read_records=n, id_read_s=seconds)
    common.log(f"id read: {n} records in {seconds:.2f} s ({n / seconds:,.0f} records/s); at "
               f"1M pairs {1e6 / n * seconds / 60:.1f} min on one process, "
               f"{1e6 / n * seconds / 60 / 64:.2f} min each on 64 processes")
  common.record("scio_table", figures, load_start=load_start,
                note="both tables (active + pending) in one checkpoint step")


if __name__ == "__main__":
  main()
