r"""Per-op profile of a compiled train step on CPU: where the time goes, by source line.

Traces a few steps with jax.profiler (host tracer level 3 and XLA's per-thunk TraceMe, so each
executed HLO instruction is an event), then joins every event with the optimized HLO: the
instruction's matmul FLOPs (bench/flops.py), whether it is forward or backward (op_name), and
the innermost klip/optax/flax source line it came from. Prints the time by category (matmuls,
copies/transposes, other fusions, optimizer), the source lines that cost most, each with its
achieved GFLOP/s, and the costliest instructions.

Times are summed over the XLA thread pool's threads (thread-seconds per step); the step's wall
time is printed beside them.

  .venv/bin/python -m bench.profile_step --step=b1_ti        # B1's project step, ViT-Ti
  .venv/bin/python -m bench.profile_step --step=b1_lean_ti
  .venv/bin/python -m bench.profile_step --step=b2_pair --steps=1
  .venv/bin/python -m bench.profile_step --step=tiny
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from bench import flops as flops_lib  # noqa: E402  pylint: disable=g-import-not-at-top

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order


def _step(name: str):
  """(runner with .compiled and .run(n), batch size) for a step name."""
  if name.startswith("b1_lean_"):
    from bench.b1_contrast import LeanStep  # pylint: disable=g-import-not-at-top
    config = common.pair_config(name.rsplit("_", 1)[1])
    s = LeanStep(config, common.synthetic_batch(config))
  elif name.startswith("b1_"):
    config = common.pair_config(name.rsplit("_", 1)[1])
    s = common.ProjectStep(config)
  elif name == "b2_pair":
    config = common.pair_config("ti", full=True)
    s = common.ProjectStep(config)
  elif name in ("tiny", "small"):
    config = common.variant_config(name)
    s = common.ProjectStep(config)
  else:
    raise ValueError(f"unknown step {name!r}")
  s.compile()
  return s, config.batch_size


def category(entry: dict, name: str) -> str:
  if entry["flops"] > 0:
    return "matmul"
  if "optax" in entry["where"] or "optim.py" in entry["where"]:
    return "optimizer (element-wise)"
  if "copy" in name or "transpose" in name:
    return "copy / transpose"
  return "other (element-wise, reductions)"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--step", default="b1_ti")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  log = common.log
  step, batch = _step(args.step)
  table = flops_lib.instruction_table(step.compiled.as_text())
  step.run(1)
  trace_dir = tempfile.mkdtemp(prefix="klip_profile_")
  opts = jax.profiler.ProfileOptions()
  opts.host_tracer_level = 3
  jax.profiler.start_trace(trace_dir, profiler_options=opts)
  t = time.perf_counter()
  walls = step.run(args.steps)
  wall = time.perf_counter() - t
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  per_instr = collections.Counter()
  calls = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in table:
          per_instr[ev.name] += ev.duration_ns / 1e9 / args.steps
          calls[ev.name] += 1
  op_time = sum(per_instr.values())
  step_s = common.median(walls)
  log(f"profile of {args.step} (batch {batch}): wall {step_s:.2f} s/step; op time "
      f"{op_time:.2f} thread-s/step over {len(per_instr)} instructions "
      f"({len(table)} in the program); load {common.load():.1f}")
  # By category.
  cats = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for name, sec in per_instr.items():
    e = table[name]
    c = cats[category(e, name)]
    c[0] += sec
    c[1] += e["flops"]
    c[2] += 1
  total_flops = sum(e["flops"] for e in table.values())
  rows = [[k, v[0], f"{v[0] / op_time:.1%}", v[1] / 1e9,
           (v[1] / v[0] / 1e9) if v[0] and v[1] else float("nan"), v[2]]
          for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])]
  log(common.table(rows, ["category", "thread-s/step", "share", "GFLOP", "GFLOP/s",
                          "instructions"]))
  log(f"(all matmul FLOPs of the program: {total_flops / 1e9:.1f} G/step; "
      f"{total_flops / step_s / 1e9:.1f} GFLOP/s over the wall time)")
  # By source line and direction.
  where = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for name, sec in per_instr.items():
    e = table[name]
    direction = "bwd" if "transpose(" in e["op_name"] else "fwd"
    key = (direction, e["where"], "matmul" if e["flops"] else category(e, name).split(" ")[0])
    w = where[key]
    w[0] += sec
    w[1] += e["flops"]
    w[2] += 1
  rows = [[d, loc, kind, v[0], f"{v[0] / op_time:.1%}", v[1] / 1e9,
           (v[1] / v[0] / 1e9) if v[0] and v[1] else float("nan"), v[2]]
          for (d, loc, kind), v in sorted(where.items(), key=lambda kv: -kv[1][0])[:args.top]]
  log(f"\ntop {args.top} source lines")
  log(common.table(rows, ["dir", "source", "kind", "thread-s", "share", "GFLOP", "GFLOP/s",
                          "instr"]))
  rows = [[name, table[name]["op"], table[name]["where"], sec, f"{sec / op_time:.1%}",
           table[name]["flops"] / 1e9,
           table[name]["flops"] / sec / 1e9 if table[name]["flops"] else float("nan")]
          for name, sec in per_instr.most_common(15)]
  log("\ncostliest instructions")
  log(common.table(rows, ["instruction", "op", "source", "thread-s", "share", "GFLOP",
                          "GFLOP/s"]))
  return {"per_instr": dict(per_instr), "categories": dict(cats), "wall": wall}


if __name__ == "__main__":
  main()
