r"""B2: the full training step (contrast + match with hard negatives + reconstruct) vs B1.

The project's train step (`klip.train_step.make_train_step` over `klip.objectives.total`) with the
three objectives at their default weights, interleaved with the contrast-only step (B1's) and
the f32 matmul calibration, at two sizes:

  pair  B1's shapes (ViT-Ti/16 at 224 px, 12 x 512 text, 64 tokens, batch 16) with base's
        defaults for the rest: matching runs the text tower's top 3 blocks (with
        cross-attention) on the lower states of the contrastive pass, a 2-block decoder;
  tiny  configs/pretrain.py:tiny as it trains (batch 32), against the same config with only
        the contrastive weight (and `text.fusion_layers=0`, `decoder.depth=0`).

Per step: pairs/s, matmul FLOPs per pair (analytic and from the compiled HLO), achieved
FLOP/s, fraction of the same-run f32 matmul rate, and the two targets: FLOPs per pair of the
full step at most 2.2x the contrastive step's, achieved FLOP/s at least 0.9x. The analytic
breakdown by component shows where the full step's FLOPs go.

  .venv/bin/python -m bench.b2_full                       # pair and tiny, 3 rounds
  .venv/bin/python -m bench.b2_full --sizes=tiny --rounds=1
"""

from __future__ import annotations

import argparse

from bench import common
from bench import flops as flops_lib

FLOP_TARGET, RATE_TARGET = 2.2, 0.9


def _configs(size: str, batch: int):
  if size == "pair":
    return (common.pair_config("ti", batch=batch),
            common.pair_config("ti", full=True, batch=batch))
  full = common.variant_config("tiny", **({"batch_size": batch} if batch else {}))
  contrast = common.variant_config(
      "tiny", **{"loss.match_weight": 0.0, "loss.reconstruct_weight": 0.0,
                 "loss.clause_contrast_weight": 0.0,  # the contrastive step alone
                 "model.text.fusion_layers": 0, "model.decoder.depth": 0,
                 **({"batch_size": batch} if batch else {})})
  return contrast, full


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="pair,tiny")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=1, help="timed steps per round (tiny: x8)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps before each step's timed ones, every round")
  p.add_argument("--batch", type=int, default=0, help="0: 16 for pair, the config's for tiny")
  args = p.parse_args(argv)
  load_start = common.load()
  log = common.log
  log(f"B2 full step vs contrastive step; {common.machine()}; {common.versions()}")
  steps, info = {}, {}
  for size in [s for s in args.sizes.split(",") if s]:
    batch = args.batch or (16 if size == "pair" else 0)
    for kind, config in zip(("contrast", "full"), _configs(size, batch)):
      key = f"{size}_{kind}"
      ps = common.ProjectStep(config)
      comp = ps.compile()
      xla = flops_lib.compiled_flops(ps.compiled)
      count = (flops_lib.full_step(config) if kind == "full"
               else flops_lib.contrast_step(config.model, config.batch_size))
      ps.run(1)
      steps[key] = ps
      info[key] = dict(size=size, kind=kind, batch=config.batch_size, analytic=count.train_total,
                       counted=xla["matmul"], breakdown=count.train, **comp)
      log(f"{key}: compiled in {comp['lower_s']:.1f}+{comp['compile_s']:.1f} s; matmul "
          f"GFLOP/step XLA {xla['matmul'] / 1e9:.2f}, analytic {count.train_total / 1e9:.2f}")
  calib = common.MatmulCalibration()
  tasks = {"xla_matmul": calib.measure}
  for key, ps in steps.items():
    n = args.steps * (8 if key.startswith("tiny") else 1)
    tasks[key] = (lambda s=ps, b=info[key]["batch"], n=n: b / common.median(
        s.run(args.warmup + n)[args.warmup:]))
  rates = common.interleave(tasks, args.rounds, log=log)
  mm = rates["xla_matmul"]
  rows, figures, target_rows = [], {}, []
  for key, r in info.items():
    pairs = rates[key]
    per_pair = r["counted"] / r["batch"]
    achieved = [x * per_pair for x in pairs]
    r.update(pairs_per_s=common.median(pairs), gflop_per_pair=per_pair / 1e9,
             achieved=achieved, achieved_gflops=common.median(achieved) / 1e9,
             frac=common.median(common.ratios(achieved, mm)))
    rows.append([r["size"], r["kind"], r["batch"], r["pairs_per_s"], r["gflop_per_pair"],
                 f"{r['counted'] / r['analytic'] - 1:+.2%}", r["achieved_gflops"],
                 f"{r['frac']:.0%}"])
    figures[f"{key}_pairs_s"] = r["pairs_per_s"]
    figures[f"{key}_gflop_pair"] = r["gflop_per_pair"]
    figures[f"{key}_frac_matmul"] = r["frac"]
  for size in {r["size"] for r in info.values()}:
    c, f = info[f"{size}_contrast"], info[f"{size}_full"]
    flop_ratio = f["gflop_per_pair"] / c["gflop_per_pair"]
    rate_ratio = common.median(common.ratios(f["achieved"], c["achieved"]))
    target_rows.append([size, flop_ratio, f"<= {FLOP_TARGET}",
                        "met" if flop_ratio <= FLOP_TARGET else "MISSED", rate_ratio,
                        f">= {RATE_TARGET}", "met" if rate_ratio >= RATE_TARGET else "MISSED",
                        f["pairs_per_s"] / c["pairs_per_s"]])
    figures[f"{size}_flop_ratio"] = flop_ratio
    figures[f"{size}_flops_rate_ratio"] = rate_ratio
  log("")
  log(f"B2 full step vs contrastive step ({args.rounds} interleaved rounds; same-run XLA f32 "
      f"matmul {common.median(mm) / 1e9:.0f} GFLOP/s; load {load_start:.1f}->"
      f"{common.load():.1f})")
  log(common.table(rows, ["size", "step", "batch", "pairs/s", "GFLOP/pair", "XLA vs analytic",
                          "GFLOP/s", "of XLA mm"]))
  log("\nTargets (full / contrastive)")
  log(common.table(target_rows, ["size", "FLOPs/pair", "target", "", "FLOP/s", "target", "",
                                 "pairs/s"]))
  for size in sorted({r["size"] for r in info.values()}):
    f = info[f"{size}_full"]
    total = sum(f["breakdown"].values())
    log(f"\nwhere the full step's FLOPs go ({size}, analytic, training):")
    log(common.table([[k, v / f["batch"] / 1e9, f"{v / total:.1%}"]
                      for k, v in sorted(f["breakdown"].items(), key=lambda kv: -kv[1])],
                     ["component", "GFLOP/pair", "share"]))
  figures["xla_matmul_gflops"] = common.median(mm) / 1e9
  common.record("b2", figures, load_start=load_start,
                note=f"{args.rounds} rounds, {args.warmup} untimed step(s) first")
  return {"info": info, "rates": rates, "figures": figures}


if __name__ == "__main__":
  main()
