r"""`make bench`: runs B1-B6 one after another and prints one table, open_clip side by side.

Each benchmark runs as its own process (`python -m bench.bN_...`), prints its own tables and
appends its own row to bench/RESULTS.md; this script then reads their figures from
bench/out/bN.json (or $OUT) and prints the summary with the issue's targets.

  .venv/bin/python -m bench.run_all                 # everything (about 40 min on 2 shared cores)
  .venv/bin/python -m bench.run_all --quick         # 1 round each, ViT-Ti only
  .venv/bin/python -m bench.run_all --only=b1,b4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import common
from klip import host_memory

BENCHES = {
    "b1": ("bench.b1_contrast", [], ["--vits=ti", "--rounds=1"]),
    "b2": ("bench.b2_full", [], ["--rounds=1"]),
    "b3": ("bench.b3_scio", [], ["--rounds=1", "--steps=5"]),
    "b4": ("bench.b4_eval", [], ["--vits=ti", "--rounds=1"]),
    "b5": ("bench.b5_input", [], ["--rounds=1", "--batches=10", "--steps=5"]),
    "b6": ("bench.b6_compile", [], ["--configs=tiny,pair_contrast"]),
}


def _load(name: str) -> dict:
  path = os.path.join(common.OUT_DIR, f"{name}.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get("figures", {})


def _f(x, fmt="{:.2f}") -> str:
  if isinstance(x, (int, float)) and x == x:
    return fmt.format(x)
  return "-" if x is None or x != x else str(x)


def summary(started: float) -> str:
  rows = []
  b1 = _load("b1")
  for vit in ("ti", "s"):
    if f"klip_{vit}_pairs_s" in b1:
      ratio = b1.get(f"klip_{vit}_vs_open_clip")
      frac = b1.get(f"klip_{vit}_frac_matmul")
      rows.append([f"B1 contrast step ViT-{vit.upper()}/16 (pairs/s)",
                   _f(b1.get(f"klip_{vit}_pairs_s")), _f(b1.get(f"open_clip_best_{vit}_pairs_s")),
                   _f(ratio, "{:.2f}x"), f"{_f(frac, '{:.0%}')} of mm",
                   ">= 1.15x, >= 80 %: " + ("met" if (ratio or 0) >= 1.15 and (frac or 0) >= 0.8
                                            else "missed")])
      if f"lean_{vit}_pairs_s" in b1:
        rows.append([f"   lean JAX step ViT-{vit.upper()}/16",
                     _f(b1.get(f"lean_{vit}_pairs_s")), "",
                     _f(b1.get(f"lean_{vit}_vs_open_clip"), "{:.2f}x"),
                     f"{_f(b1.get(f'lean_{vit}_frac_matmul'), '{:.0%}')} of mm", ""])
      if f"{vit}_flop_parity" in b1:
        rows.append([f"   FLOP parity ViT-{vit.upper()}/16 (XLA vs torch)", "", "",
                     b1[f"{vit}_flop_parity"], "", "within 2 %"])
  b2 = _load("b2")
  for size in ("pair", "tiny"):
    if f"{size}_full_pairs_s" in b2:
      fr, rr = b2.get(f"{size}_flop_ratio"), b2.get(f"{size}_flops_rate_ratio")
      rows.append([f"B2 full step, {size} (pairs/s)", _f(b2.get(f"{size}_full_pairs_s")), "",
                   f"FLOPs {_f(fr, '{:.2f}x')}, FLOP/s {_f(rr, '{:.2f}x')} of B1's",
                   f"{_f(b2.get(f'{size}_full_frac_matmul'), '{:.0%}')} of mm",
                   "<= 2.2x, >= 0.9x: " + ("met" if (fr or 9) <= 2.2 and (rr or 0) >= 0.9
                                           else "missed")])
  b3 = _load("b3")
  if b3:
    rows.append(["B3 SCIO pass, tiny (pairs/s)", _f(b3.get("proofread_pairs_s")), "",
                 f"{_f(b3.get('proofread_share_steady'), '{:.1%}')} of wall @ every 50",
                 f"run: {_f(b3.get('run_share'), '{:.1%}')}",
                 f"refill all: {_f(b3.get('fill_all_pairs_s'))} pairs/s"])
  b4 = _load("b4")
  for vit in ("ti", "s"):
    for what in ("image", "text"):
      key = f"klip_{vit}_{what}"
      if f"{key}_per_s" in b4:
        ratio = b4.get(f"{key}_vs_open_clip")
        rows.append([f"B4 {what} embeddings/s ViT-{vit.upper()}/16",
                     _f(b4.get(f"{key}_per_s")), _f(b4.get(f"open_clip_best_{vit}_{what}_per_s")),
                     _f(ratio, "{:.2f}x"), "",
                     ">= 1.0x: " + ("met" if (ratio or 0) >= 1.0 else "missed")])
  if "retrieval_xla_rows_s" in b4:
    rows.append(["B4 retrieval top-10, query rows/s (XLA | torch; host argsort)",
                 _f(b4.get("retrieval_xla_rows_s"), "{:.0f}"),
                 _f(max(b4.get("retrieval_torch_rows_s", 0), b4.get("retrieval_torchp_rows_s", 0)),
                    "{:.0f}"),
                 "", f"host {_f(b4.get('retrieval_host_rows_s'), '{:.0f}')}", ""])
  b5 = _load("b5")
  if b5:
    r = b5.get("pipeline_over_step")
    rows.append(["B5 input pipeline, tiny (examples/s)",
                 _f(b5.get("pipeline_examples_s"), "{:.0f}"), "",
                 f"{_f(r, '{:.1f}x')} the step's {_f(b5.get('step_examples_s'))}", "",
                 ">= 3x: " + ("met" if (r or 0) >= 3 else "missed")])
  b6 = _load("b6")
  for name in ("tiny", "tiny_scan", "pair_contrast", "pair_full", "pair_full_scan"):
    if f"{name}_compile_s" in b6:
      rows.append([f"B6 compile {name} (s: lower + compile)",
                   f"{b6[f'{name}_lower_s']:.1f} + {b6[f'{name}_compile_s']:.1f}", "", "", "",
                   ""])
  head = (f"KLIP benchmarks ({common.machine()}; load now {common.load():.1f}; "
          f"{(time.time() - started) / 60:.0f} min). Rates on a shared machine compare only as "
          "same-run ratios.")
  return head + "\n" + common.table(rows, ["benchmark", "klip", "open_clip", "ratio / share",
                                           "of f32 matmul", "target"])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default=",".join(BENCHES))
  p.add_argument("--quick", action="store_true", help="1 round, ViT-Ti only")
  p.add_argument("--summary_only", action="store_true")
  args = p.parse_args(argv)
  started = time.time()
  failed = []
  if not args.summary_only:
    for name in [n for n in args.only.split(",") if n]:
      module, full, quick = BENCHES[name]
      cmd = [sys.executable, "-m", module] + (quick if args.quick else full)
      stale = os.path.join(common.OUT_DIR, f"{name}.json")
      if os.path.exists(stale):
        os.remove(stale)
      common.log(f"\n=== {name}: {' '.join(cmd[1:])}")
      rc = subprocess.call(cmd, cwd=common.ROOT, env=host_memory.environ())
      if rc:
        failed.append(name)
  common.log("\n" + summary(started))
  if failed:
    common.log(f"failed: {failed}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
