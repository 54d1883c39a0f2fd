r"""B6: compile time of the train step (tiny, and B1's shapes).

Lowering (tracing the NNX model into StableHLO) and XLA compilation of
`klip.train_step.make_train_step` as the trainer jits it, timed separately, with the persistent
compilation cache off, for:

  tiny            configs/pretrain.py:tiny (the three objectives)
  pair_contrast   B1's step (ViT-Ti/16 + 12 x 512 text, contrast only)
  pair_full       B2's step at B1's shapes (the three objectives, 12-block decoder)
  *_scan          the same with `model.scan_layers=True` (one scanned block per stack instead
                  of unrolled layers; a config field, no code change)

The HLO size (instructions in the optimized module) comes with each.

  .venv/bin/python -m bench.b6_compile
  .venv/bin/python -m bench.b6_compile --configs=tiny,tiny_scan
"""

from __future__ import annotations

import argparse

from bench import common

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order


def _config(name: str):
  scan = name.endswith("_scan")
  base = name[:-5] if scan else name
  if base == "tiny":
    c = common.variant_config("tiny")
  elif base == "pair_contrast":
    c = common.pair_config("ti")
  elif base == "pair_full":
    c = common.pair_config("ti", full=True)
  else:
    raise ValueError(f"unknown config {name!r}")
  if scan:
    c.unlock()
    c.model.scan_layers = True
    c.lock()
  return c


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="tiny,tiny_scan,pair_contrast,pair_full,pair_full_scan")
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  load_start = common.load()
  log = common.log
  log(f"B6 compile time; {common.machine()}; {common.versions()}")
  rows, figures = [], {}
  for name in [n for n in args.configs.split(",") if n]:
    ps = common.ProjectStep(_config(name))
    t = ps.compile()
    instructions = sum(1 for line in ps.compiled.as_text().splitlines() if " = " in line)
    ps.run(1)
    first = ps.run(1)[0]
    rows.append([name, t["lower_s"], t["compile_s"], t["lower_s"] + t["compile_s"],
                 instructions, first, (t["lower_s"] + t["compile_s"]) / first])
    figures[f"{name}_lower_s"] = t["lower_s"]
    figures[f"{name}_compile_s"] = t["compile_s"]
    log(f"{name}: lower {t['lower_s']:.1f} s, compile {t['compile_s']:.1f} s, "
        f"{instructions} HLO instructions, step {first:.2f} s")
    del ps
  log("")
  log(f"B6 compile time of the train step (persistent cache off; load {load_start:.1f}->"
      f"{common.load():.1f})")
  log(common.table(rows, ["config", "lower s", "compile s", "total s", "HLO instr",
                          "step s", "total / step"]))
  common.record("b6", figures, load_start=load_start)
  return {"figures": figures}


if __name__ == "__main__":
  main()
