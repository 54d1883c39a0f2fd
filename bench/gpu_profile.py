"""Where a GPU step's time goes: GPU kernel time by kind, from a jax.profiler trace.

XLA on GPU runs a step as CUDA graphs ("command buffers"), so the trace's HLO names only say
which graph a kernel ran in; the kernel's own name says what it is. Kernels are grouped into
GEMMs (cuBLAS's nvjet/xmma kernels and XLA's Triton gemm fusions), cuDNN's fused attention,
copies (memcpy), and XLA's other fusions by kind with their numbers stripped (loop_add_fusion,
input_reduce_fusion, ...).

  bench/gpu.sh --profile           # after the timed steps: traces 2 steps, prints the table
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile

GEMM_MARKS = ("nvjet", "gemm", "xmma", "cutlass", "cublas")


def kernel_kind(name: str) -> str:
  """'gemm', 'cudnn attention', 'copy', or the kernel's name without numbers
  ('loop_add_fusion')."""
  low = name.lower()
  if "cudnn" in low:
    return "cudnn attention"
  if any(mark in low for mark in GEMM_MARKS):
    return "gemm"
  if low.startswith("memcpy") or low.startswith("memset"):
    return "copy"
  return re.sub(r"[._]\d+", "", name)


def capture(run_steps, out_dir: str) -> str:
  """Traces `run_steps()` with jax.profiler; copies the trace to OUT_DIR/trace.xplane.pb."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      run_steps()
    found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not found:
      raise RuntimeError(f"jax.profiler wrote no *.xplane.pb under {tmp}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "trace.xplane.pb")
    shutil.copy(found[0], path)
  return path


def kernel_table(path: str, steps: int) -> dict:
  """{'kinds': [(kind, seconds per step, share, launches per step)], 'kernels': the same per
  kernel name, 'busy_s', 'span_s'} for the first GPU's kernels in the trace at `path` (`steps`
  steps traced). XLA names a fusion's kernel after the fusion, so a name can be looked up in the
  compiled HLO (`--profile` writes it beside the trace)."""
  import jax  # pylint: disable=g-import-not-at-top
  data = jax.profiler.ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:GPU:")]
  if not planes:
    raise ValueError(f"{path}: no GPU device plane in the trace (planes: "
                     f"{[p.name for p in data.planes]}); kernel times need a GPU run")
  events = [e for line in sorted(planes, key=lambda p: p.name)[0].lines for e in line.events]
  if not events:
    raise ValueError(f"{path}: the GPU plane holds no kernel events")
  seconds, launches = collections.Counter(), collections.Counter()
  by_name, name_launches = collections.Counter(), collections.Counter()
  for e in events:
    kind = kernel_kind(e.name)
    seconds[kind] += e.duration_ns * 1e-9
    launches[kind] += 1
    by_name[e.name] += e.duration_ns * 1e-9
    name_launches[e.name] += 1
  busy = sum(seconds.values())
  start = min(e.start_ns for e in events)
  end = max(e.start_ns + e.duration_ns for e in events)

  def rows(secs, counts):
    return [(k, s / steps, s / busy, counts[k] / steps) for k, s in secs.most_common()]

  return {"kinds": rows(seconds, launches), "kernels": rows(by_name, name_launches),
          "busy_s": busy / steps, "span_s": (end - start) * 1e-9 / steps}
