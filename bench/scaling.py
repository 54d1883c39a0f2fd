"""Scaling arithmetic: step time, MFU and time to pretrain base and large on TPU pods, on paper.

  python -m bench.scaling                          # base and large on v5e-256 and v5p-1024
  python -m bench.scaling --per_chip_batch=32      # at another per-chip batch

What is computed, from what (bench/README.md, "Scaling arithmetic"):
- FLOPs per step: the analytic training count of the three objectives (`bench.flops.full_step`,
  matrix products only, which B2 checks against XLA's compiled HLO), at the config's global
  batch or `--per_chip_batch` x chips. Remat recomputation is not counted (model FLOPs, as MFU
  is defined).
- Chip peak: dense bf16 matmul TFLOP/s from the vendor's spec sheet (PEAK_TFLOPS), per chip.
- MFU is an assumption, not a measurement: the rows give the step time at each of
  ASSUMED_MFU (0.28: what base reached on one H200, bench/RESULTS.md; 0.50: MaxText's dense
  models on TPU). Step time = FLOPs per step / (chips x peak x MFU).
- Hours: one pass over 1M and over 100M pairs (steps = pairs / global batch), and the config's
  own total_steps. Input, checkpointing, SCIO and evaluation time are left out (SCIO's target
  is <= 5 % of wall time).
"""

from __future__ import annotations

from absl import app
from absl import flags

from bench import flops as flops_lib
from configs import pretrain

# Dense bf16 TFLOP/s per chip (Google Cloud TPU documentation) and chips per slice name.
PEAK_TFLOPS = {"v5e": 197.0, "v5p": 459.0}
TOPOLOGIES = (("v5e-256", "v5e:16x16", "v5e", 256), ("v5p-1024", "v5:8x8x8", "v5p", 512))
ASSUMED_MFU = (0.28, 0.50)
PAIRS = (1_000_000, 100_000_000)

_PER_CHIP = flags.DEFINE_integer("per_chip_batch", 0, "Examples per chip (0: the config's "
                                 "global batch over the slice's chips).")


def rows(per_chip_batch: int = 0) -> list[dict]:
  out = []
  for variant in ("base", "large"):
    config = pretrain.get_config(variant)
    for name, topology, chip, chips in TOPOLOGIES:
      batch = per_chip_batch * chips if per_chip_batch else int(config.batch_size)
      step_flops = flops_lib.full_step(config, batch=batch).train_total
      peak = PEAK_TFLOPS[chip] * 1e12 * chips
      for mfu in ASSUMED_MFU:
        step_s = step_flops / (peak * mfu)
        out.append(dict(
            variant=variant, slice=name, topology=topology, chips=chips, batch=batch,
            per_chip=batch / chips, pflop_step=step_flops / 1e15, mfu=mfu, step_s=step_s,
            examples_s=batch / step_s,
            hours={n: n / batch * step_s / 3600 for n in PAIRS},
            hours_total=int(config.total_steps) * step_s / 3600,
            total_steps=int(config.total_steps)))
  return out


def table(per_chip_batch: int = 0) -> str:
  head = ("| variant | slice (topology) | global batch (per chip) | PFLOP/step | assumed MFU | "
          "step s | examples/s | hours / epoch of 1M | hours / epoch of 100M | "
          "hours for total_steps |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows(per_chip_batch):
    lines.append(
        f"| {r['variant']} | {r['slice']} ({r['topology']}) | {r['batch']} "
        f"({r['per_chip']:g}) | {r['pflop_step']:.2f} | {r['mfu']:.2f} | {r['step_s']:.3f} | "
        f"{r['examples_s']:,.0f} | {r['hours'][PAIRS[0]]:.3f} | {r['hours'][PAIRS[1]]:.2f} | "
        f"{r['hours_total']:.1f} ({r['total_steps']:,} steps) |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(table(_PER_CHIP.value))


if __name__ == "__main__":
  app.run(main)
