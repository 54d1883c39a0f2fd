r"""GPU benchmark: the `base` config's full multi-objective train step, bf16, one accelerator.

configs/pretrain.py:base (ViT-B/16 at 224 px, 12 x 768 text tower whose top 3 blocks
cross-attend for matching, 2-block decoder, 160 tokens, vocabulary 32,000; bf16, unrolled
layers, remat `dots_saveable`, attention "auto": cuDNN's fused kernel on the GPU) trained by
the project's step (`klip.train_step.make_train_step`) on synthetic in-memory batches. Prints
examples/s, matmul FLOPs per example (analytic and from the compiled HLO), achieved TFLOP/s,
MFU against the 989 TFLOP/s dense bf16 peak of an H100/H200, and the fraction of a bf16 matmul
measured in the same run; writes them to $OUT/gpu.json (else bench/out/gpu.json) with the row
for bench/RESULTS.md.

The GPU host has jax (CUDA), flax, optax and orbax but no Grain, TFDS or SentencePiece and no
network. Nothing here imports them: an import guard makes any attempt fail loudly (the
tokenizer module imports SentencePiece only when a tokenizer is loaded). `--small` runs the same
path on CPU at tiny shapes, to prove it works end to end.

  bench/gpu.sh                        # on the GPU host (a few minutes: compile + 10 steps)
  bench/gpu.sh --batch=128 --steps=5
  bench/gpu.sh --small                # CPU, tiny shapes
  bench/gpu.sh --set=model.attention=xla --tag=xla_attention   # a variant
  bench/gpu.sh --profile              # also: GPU kernel time by kind (bench/gpu_profile.py)
"""

from __future__ import annotations

import argparse
import ast
import gc
import gzip
import importlib.abc
import importlib.util
import os
import sys
import time

PEAK_BF16 = 989e12  # H100 SXM dense bf16 (H200: the same)
BLOCKED = ("grain", "tensorflow_datasets", "tensorflow", "array_record", "tensorboardX",
           "sentencepiece")
REQUIRED = ("jax", "flax", "optax", "numpy", "ml_collections")


class _Guard(importlib.abc.MetaPathFinder):
  """Refuses the data stack's packages: the GPU host does not have them."""

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"bench.gpu_step must not import {name!r} (absent on the GPU host); "
                        "something on the train step's import chain pulls in the data stack")
    return None


def install_guard() -> None:
  sys.meta_path.insert(0, _Guard())


def check_required() -> None:
  missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
  if missing:
    sys.exit(f"bench.gpu_step: missing Python packages {missing} in {sys.executable}. "
             "jax (with the accelerator plugin), flax, optax and numpy come with the GPU host; "
             "ml_collections (pure Python, for configs/pretrain.py) is taken from the local "
             ".venv when that is carried along (bench/gpu.sh finds it), else `pip install "
             "ml_collections`.")


def small_config(common, batch: int, **overrides):
  """tiny's shapes with base's compute settings (bf16, remat), for a CPU check."""
  return common.variant_config(
      "tiny", batch_size=batch, **{"model.dtype": "bfloat16", "model.remat_policy": "dots_saveable",
                                   **overrides})


def profile(ps, dot_flops: float, step_s: float, log, common, name: str) -> dict:
  """Traces two steps; prints GPU kernel time by kind and the costliest kernels by name, and the
  GEMM kernels' own rate (`dot_flops`: the HLO's dots, which the GEMM kernels run; cuDNN's
  attention is a custom call outside them); writes the compiled step's HLO (gzipped) beside the
  trace, to look the kernels' fusions up in; returns the GEMM, attention and copy shares of
  kernel time and the GEMM rate."""
  from bench import gpu_profile  # pylint: disable=g-import-not-at-top
  path = gpu_profile.capture(lambda: ps.run(2), common.OUT_DIR)
  table = gpu_profile.kernel_table(path, steps=2)
  hlo_path = os.path.join(common.OUT_DIR, f"{name}.hlo.txt.gz")
  with gzip.open(hlo_path, "wt") as f:
    f.write(ps.compiled.as_text())
  log(f"\nGPU kernels per step (trace of 2 steps, {path}; compiled HLO {hlo_path}): busy "
      f"{table['busy_s'] * 1e3:.1f} ms of a {table['span_s'] * 1e3:.1f} ms span; timed step "
      f"{step_s * 1e3:.1f} ms")
  log(common.table([[k[:60], s * 1e3, f"{share:.1%}", n]
                    for k, s, share, n in table["kinds"][:16]],
                   ["kernel kind", "ms/step", "share", "launches/step"]))
  log(common.table([[k[:90], s * 1e3, f"{share:.1%}", n]
                    for k, s, share, n in table["kernels"][:40]],
                   ["kernel", "ms/step", "share", "launches/step"]))
  share = {k: sh for k, _, sh, _ in table["kinds"]}
  gemm_s = sum(s for k, s, _, _ in table["kinds"] if k == "gemm")
  figures = {"gemm_share": share.get("gemm", 0.0), "copy_share": share.get("copy", 0.0),
             "attention_share": share.get("cudnn attention", 0.0),
             "gemm_kernel_tflops": dot_flops / gemm_s / 1e12 if gemm_s else 0.0}
  log(f"GEMM kernels: {figures['gemm_kernel_tflops']:.0f} TFLOP/s (the HLO's dot FLOPs / GEMM "
      "kernel time)")
  return figures


def parse_set(text: str) -> tuple[str, object]:
  """'model.remat_policy=none' -> ('model.remat_policy', 'none'); values are Python literals
  where they parse as one (numbers, True/False), else strings."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (a dotted config key), got "
                                     f"{text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="tiny shapes on CPU")
  p.add_argument("--batch", type=int, default=0, help="0: 256 (base), 8 (--small)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--matmul", type=int, default=0, help="calibration size (0: 8192, 1024 small)")
  p.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                 help="config override on top of base (repeatable), e.g. "
                      "model.remat_policy=none")
  p.add_argument("--tag", default="", help="names the variant: writes gpu_TAG.json")
  p.add_argument("--profile", action="store_true",
                 help="trace 2 more steps: GPU kernel time by kind, OUT/trace.xplane.pb")
  args = p.parse_args(argv)
  if args.profile and args.small:
    p.error("--profile reads GPU kernel times: it needs the GPU run, not --small")
  os.environ["BENCH_PLATFORM"] = "cpu" if args.small else "auto"
  install_guard()
  check_required()
  t_start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  from bench import common  # pylint: disable=g-import-not-at-top
  from bench import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from klip.train_step import make_train_step  # pylint: disable=g-import-not-at-top
  log = common.log
  load_start = common.load()
  dev = jax.devices()[0]
  log(f"GPU step benchmark: {dev.platform} {getattr(dev, 'device_kind', '')} x"
      f"{jax.device_count()}; {common.versions()}; python {sys.version.split()[0]}")
  if not args.small and dev.platform == "cpu":
    sys.exit("bench.gpu_step: no accelerator visible to jax (use --small for the CPU check)")
  batch = args.batch or (8 if args.small else 256)

  overrides = dict(args.set)

  def make_config(batch):
    if args.small:
      return small_config(common, batch, **overrides)
    return common.variant_config("base", batch_size=batch, **overrides)

  config = make_config(batch)
  count = flops_lib.full_step(config)
  analytic = count.train_total
  while True:
    ps = None
    try:
      ps = common.ProjectStep(config, make_train_step=make_train_step)
      comp = ps.compile()
      ps.run(args.warmup)
      break
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e) or batch <= 8:
        raise
      log(f"batch {batch} does not fit ({str(e).splitlines()[0][:160]}); halving")
      del ps
      gc.collect()
      batch //= 2
      config = make_config(batch)
      count = flops_lib.full_step(config)
      analytic = count.train_total
  xla = flops_lib.compiled_flops(ps.compiled)
  log(f"batch {batch}: lowered in {comp['lower_s']:.1f} s, compiled in {comp['compile_s']:.1f} "
      f"s; matmul FLOPs/step analytic {analytic / 1e12:.3f} T, XLA (HLO dots, loops x trip "
      f"count) {xla['matmul'] / 1e12:.3f} T" + (f", uncounted custom calls "
                                                f"{xla['uncounted_custom_calls']}"
                                                if "uncounted_custom_calls" in xla else ""))
  times = ps.run(args.steps)
  step_s = common.median(times)
  mm_n = args.matmul or (1024 if args.small else 8192)
  calib = common.MatmulCalibration(n=mm_n, dtype="bfloat16", inner=1 if args.small else 10)
  mm = calib.measure(reps=10)
  times2 = ps.run(max(2, args.steps // 2))  # again after the calibration: drift check
  loss = float(ps.last_metrics["loss"])
  achieved = analytic / step_s
  figures = {
      "overrides": overrides,
      "device": f"{dev.platform} {getattr(dev, 'device_kind', '')}",
      "batch": batch, "step_s": step_s, "step_s_after": common.median(times2),
      "examples_per_s": batch / step_s,
      "gflop_per_example_analytic": analytic / batch / 1e9,
      "gflop_per_example_xla": xla["matmul"] / batch / 1e9,
      "achieved_tflops": achieved / 1e12, "mfu_989": achieved / PEAK_BF16,
      "bf16_matmul_tflops": mm / 1e12, "frac_bf16_matmul": achieved / mm,
      "lower_s": comp["lower_s"], "compile_s": comp["compile_s"], "loss": loss,
      "wall_s": time.perf_counter() - t_start,
  }
  try:
    stats = dev.memory_stats() or {}
    figures["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
  except Exception:  # pylint: disable=broad-except
    pass
  log("")
  log(f"{'small (tiny shapes, CPU check)' if args.small else 'base'} full step, bf16, batch "
      f"{batch}, {args.steps} timed steps" + (f", overrides {overrides}" if overrides else ""))
  log(common.table([
      ["examples/s", figures["examples_per_s"]],
      ["step s (median; after calibration)", f"{step_s:.4f}; {figures['step_s_after']:.4f}"],
      ["GFLOP/example analytic (matmuls, training)", figures["gflop_per_example_analytic"]],
      ["GFLOP/example XLA (HLO dots)", figures["gflop_per_example_xla"]],
      ["achieved TFLOP/s", figures["achieved_tflops"]],
      ["MFU vs 989 TFLOP/s", f"{figures['mfu_989']:.1%}"],
      ["same-run bf16 matmul TFLOP/s", figures["bf16_matmul_tflops"]],
      ["fraction of that matmul", f"{figures['frac_bf16_matmul']:.1%}"],
      ["compile s (lower + compile)", f"{comp['lower_s']:.1f} + {comp['compile_s']:.1f}"],
      ["peak memory GiB", figures.get("peak_memory_gib", float("nan"))],
  ], ["", "value"]))
  log("\nanalytic FLOPs by component (training, per example):")
  total = sum(count.train.values())
  log(common.table([[k, v / batch / 1e9, f"{v / total:.1%}"]
                    for k, v in sorted(count.train.items(), key=lambda kv: -kv[1])],
                   ["component", "GFLOP", "share"]))
  name = ("gpu_small" if args.small else "gpu") + (f"_{args.tag}" if args.tag else "")
  if args.profile:
    figures.update(profile(ps, xla["matmul"], step_s, log, common, name))
  common.record(name, figures, load_start=load_start)
  log(f"\nwrote {os.path.join(common.OUT_DIR, name + '.json')}")
  return figures


if __name__ == "__main__":
  main()
