r"""Compiles a config's train step for a device count or TPU topology without running it.

  python -m klip.compile_ahead --config=configs/pretrain.py:base --devices=8
  python -m klip.compile_ahead --config=configs/pretrain.py:large --topology=v5e:4x4 \
      --config.mesh.fsdp=16

Prints the per-device memory of the compiled executable (arguments, outputs, temporaries,
peak). With `--topology` and libtpu installed (`pip install "jax[tpu]==<jax version>"`, not part
of requirements.txt) the step is compiled by the TPU compiler for that topology, no TPU needed;
without libtpu, or without `--topology`, it is compiled for fake CPU devices and labelled a CPU
estimate (CPU layouts and fusion differ from TPU and GPU: use it for scale, not for the limit).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re

import jax
import numpy as np
from absl import app
from absl import flags
from flax.core import spmd as core_spmd

from klip import objectives
from klip import sharding
from klip import train  # defines --config, whose train step this compiles
from klip import train_state
from klip import train_step
from klip.data import pipeline

_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices (CPU estimate).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology, e.g. v5e:2x2, v5:2x2x1, v4:2x2x1.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN).")

# HBM per chip in GiB, as the TPU compiler reports it in its out-of-memory messages.
HBM_GIB = {"v4": 30.75, "v5e": 15.75, "v5": 95.74, "v6e": 31.25}
GIB = 1024 ** 3


def chips(topology: str) -> int:
  """Chip count of a topology name: 'v5e:2x2' -> 4, 'v4:2x2x1' -> 4."""
  m = re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", topology)
  if not m:
    raise ValueError(f"topology {topology!r} is not of the form v5e:2x2 or v4:2x2x1")
  return math.prod(int(d) for d in m.group(2).split("x"))


def tpu_devices(topology: str, num_slices: int) -> list:
  """Compile-only TPU devices for a topology (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           **kwargs).devices)


def batch_specs(config, mesh, rules) -> dict:
  """ShapeDtypeStructs of one global batch, with the trainer's batch shardings."""
  d = config.data
  preprocess = pipeline.Preprocess(
      tokenizer_path="", image_size=config.model.image_size, channels=config.model.channels,
      max_len=config.model.text.max_len, db_min=d.db_min, db_max=d.db_max, train=True,
      clause_len=objectives.clause_tokens_len(config))
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)  # an unreadable record is logged; here it is the point
  try:  # a missing record gives an example of the pipeline's layout, without reading data
    example = preprocess.random_map((0, None), np.random.default_rng(0))
  finally:
    root.setLevel(level)
  return {k: jax.ShapeDtypeStruct((config.batch_size,) + np.shape(v), np.asarray(v).dtype,
                                  sharding=sharding.batch_sharding(mesh, rules, np.ndim(v) + 1))
          for k, v in example.items()}


def compile_step(config, devices):
  """The compiled train step of `config` on a mesh over `devices` (nothing is allocated)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple((k, v) for k, v in config.sharding_rules)
  graphdef, abstract_state = train_state.abstract(config)
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    batch = batch_specs(config, mesh, rules)
    step_fn = jax.jit(train_step.make_train_step(config, graphdef),
                      in_shardings=(shardings, {k: v.sharding for k, v in batch.items()},
                                    replicated),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    lowered = step_fn.lower(abstract_state, batch, jax.ShapeDtypeStruct((), np.int32))
    return mesh, lowered.compile()


def memory_report(compiled, *, peak: bool) -> dict[str, int]:
  """Per-device bytes from the executable's memory analysis.

  `peak`: add the compiler's peak figure (meaningful on TPU, where temporaries can read 0 for
  small programs; the CPU compiler reports its arguments there).
  """
  m = compiled.memory_analysis()
  report = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}
  # arguments + outputs - aliased (the donated state) + temporaries: live during a step
  report["total"] = (report["arguments"] + report["outputs"] - report["aliased"] +
                     report["temporaries"])
  if peak:
    report["peak"] = m.peak_memory_in_bytes
  return report


def _format(config, mesh, report, label: str, hbm_gib: float | None) -> str:
  lines = [f"compile-ahead: {config.variant}, global batch {config.batch_size}, mesh "
           f"{dict(mesh.shape)} over {mesh.size} devices; {label}",
           "per-device memory:"]
  lines += [f"  {k:<12} {v / GIB:9.3f} GiB" for k, v in report.items()]
  if hbm_gib is not None:
    used = max(report["total"], report.get("peak", 0)) / GIB
    lines.append(f"  HBM per chip {hbm_gib:.2f} GiB: {'fits' if used <= hbm_gib else 'TOO BIG'} "
                 f"({100 * used / hbm_gib:.0f}% used)")
  return "\n".join(lines)


def main(argv):
  del argv
  config = flags.FLAGS.config
  topology, hbm = _TOPOLOGY.value, None
  on_tpu = bool(topology) and importlib.util.find_spec("libtpu") is not None
  if on_tpu:
    devices = tpu_devices(topology, _NUM_SLICES.value)
    label = f"TPU topology {topology} x {_NUM_SLICES.value} slice(s) ({devices[0].device_kind})"
    hbm = HBM_GIB.get(topology.split(":")[0])
  else:
    n = chips(topology) * _NUM_SLICES.value if topology else _DEVICES.value
    if topology:
      print(f"libtpu is not installed (pip install \"jax[tpu]=={jax.__version__}\"): "
            f"estimating {topology} on {n} CPU devices", flush=True)
    jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise app.UsageError(f"{n} devices requested, but this process has {len(devices)} CPU "
                           "devices (the backend was initialised with fewer)")
    devices = devices[:n]
    label = f"CPU estimate on {n} fake CPU devices (TPU/GPU layouts and fusion differ)"
  mesh, compiled = compile_step(config, devices)
  report = memory_report(compiled, peak=on_tpu)
  print(_format(config, mesh, report, label, hbm), flush=True)


if __name__ == "__main__":
  app.run(main)
