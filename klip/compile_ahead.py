r"""Compiles a config's train step for a device count or TPU topology without running it.

  python -m klip.compile_ahead --config=configs/pretrain.py:base --devices=8
  python -m klip.compile_ahead --config=configs/pretrain.py:base --topology=v5e:16x16
  python -m klip.compile_ahead --config=configs/pretrain.py:large --topology=v5e:4x4 \
      --config.mesh.fsdp=16

Prints the per-device memory of the compiled executable (arguments, outputs, temporaries,
peak). With `--topology` and libtpu installed (`pip install -r requirements-tpu.txt`, not part
of requirements.txt) the step is compiled by the TPU compiler for that topology, no TPU needed;
its memory is set against the chip's HBM (a fits / does-not-fit verdict), and `--fit` (on by
default there) then finds, by compiling, the largest per-chip batch that fits for each remat
policy of `--fit_policies` (`fit_search`). Without libtpu, or without `--topology`, the step is
compiled for fake CPU devices and labelled a CPU estimate (CPU layouts and fusion differ from
TPU and GPU: use it for scale, not for the limit).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import math
import re
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax.core import spmd as core_spmd

from klip import objectives
from klip import sharding
from klip import train  # noqa: F401  # defines --config, whose train step this compiles
from klip import train_state
from klip import train_step
from klip.data import pipeline
from klip.data import values as values_lib
from klip.model import layers

_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices (CPU estimate).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology, e.g. v5e:2x2, v5:2x2x1, v4:2x2x1.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN).")
_FIT = flags.DEFINE_bool("fit", True, "On a TPU topology, also find the largest per-chip batch "
                         "that fits HBM for each of --fit_policies (2-4 compiles each).")
_FIT_MAX = flags.DEFINE_integer("fit_max_per_chip", 512, "Largest per-chip batch --fit tries.")
_FIT_POLICIES = flags.DEFINE_list("fit_policies", [], "Remat policies for --fit, from least "
                                  "to most recompute (default: the config's own, then 'full').")

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
      clause_len=objectives.clause_tokens_len(config), swap=objectives.swaps(config),
      rivals=objectives.clause_rival_count(config), pool=values_lib.ValuePool({}))
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


def batch_shards(config, mesh) -> int:
  """How many ways the global batch is split: the mesh axes the "batch" logical axis maps to."""
  axes = dict(config.sharding_rules)["batch"]
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


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


def used_bytes(report: dict[str, int]) -> int:
  """Bytes a step holds on one device: the larger of the sum of its parts and the peak."""
  return max(report["total"], report.get("peak", 0))


@dataclasses.dataclass(frozen=True)
class Trial:
  """One compile of the fit search: a remat policy at a per-chip batch."""
  policy: str
  per_chip: int
  used: int | None         # bytes per device; None: the compiler ran out of HBM, or over it
  temporaries: int = 0
  seconds: float = 0.0

  @property
  def fits(self) -> bool:
    return self.used is not None


def compile_trial(config, devices, policy: str, per_chip: int, hbm: int, log=print) -> Trial:
  """Compiles `config` with remat `policy` at `per_chip` examples per batch shard."""
  shards = batch_shards(config, sharding.make_mesh(config.mesh, devices))
  c = copy.deepcopy(config)
  c.model.remat_policy = policy
  c.batch_size = per_chip * shards
  log(f"fit: compiling remat {policy!r} at per-chip batch {per_chip} (global {c.batch_size})")
  t0 = time.perf_counter()
  try:
    report = memory_report(compile_step(c, devices)[1], peak=True)
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler's out-of-HBM error
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report = None
  seconds = time.perf_counter() - t0
  used = used_bytes(report) if report else None
  trial = Trial(policy, per_chip, used if used is not None and used <= hbm else None,
                report["temporaries"] if report else 0, seconds)
  log(f"fit:   {'%.2f GiB: fits' % (used / GIB) if trial.fits else 'does not fit'} "
      f"({seconds:.0f} s)")
  return trial


def _power_of_two_below(n: int) -> int:
  return 1 << ((n - 1).bit_length() - 1)


def fit_search(config, devices, hbm_gib: float, policies, first: Trial | None = None,
               max_per_chip: int = 512,
               log=print) -> tuple[list[Trial], dict[str, tuple[int, float]]]:
  """Per remat policy, the largest per-chip batch (the start doubled or halved) within HBM.

  Policies go from least to most recompute, so each fits at least the batch of the one before;
  a policy starts there (the first starts at the config's per-chip batch b0). From the start
  compile, all of its temporaries per example bound the bytes per example from above, and the
  largest doubling this bound lets fit is compiled next. With one fitting compile the next
  doubling is compiled; with two, the line through them predicts it, and it is compiled only if
  the line says it fits, so the last "does not fit" may be a prediction (`predicted_next`). A batch that does not fit is halved until one does. `first`: the compile
  of `policies[0]` at b0, when the caller has it. Returns every compile, in order, and per policy
  the (per-chip batch, bytes) predicted not to fit where that was not compiled.
  """
  hbm = int(hbm_gib * GIB)
  mesh = sharding.make_mesh(config.mesh, devices)
  b = max(int(config.batch_size) // batch_shards(config, mesh), 1)
  trials, predicted_next = [], {}
  for policy in policies:
    known = {}

    def attempt(per_chip, policy=policy, known=known):
      known[per_chip] = compile_trial(config, devices, policy, per_chip, hbm, log)
      trials.append(known[per_chip])
      return known[per_chip]

    if first is not None and first.policy == policy and first.per_chip == b:
      known[b] = first
      trials.append(first)
    start = known.get(b) or attempt(b)
    if start.fits:  # the upper bound's largest power of two above the start, if any
      b0, per_example = b, start.temporaries / b
      while 2 * b <= max_per_chip and start.used + per_example * (2 * b - b0) <= hbm:
        b *= 2
    while True:
      t = known.get(b) or attempt(b)
      if not t.fits:
        if b == 1:
          break
        b = _power_of_two_below(b)
        if b in known and known[b].fits:
          break
        continue
      if 2 * b in known or 2 * b > max_per_chip:  # compiled and did not fit, or the cap
        break
      fitting = sorted(x for x, tr in known.items() if tr.fits)
      if len(fitting) >= 2:  # the line through the two largest fitting compiles
        x1, x2 = fitting[-2:]
        slope = (known[x2].used - known[x1].used) / (x2 - x1)
        predicted = known[x2].used + slope * (2 * b - x2)
        if predicted > hbm:
          predicted_next[policy] = (2 * b, predicted)
          break
      b *= 2  # with one fitting compile, the next doubling is compiled
    b = max((x for x, tr in known.items() if tr.fits), default=b)
  return trials, predicted_next


def best_per_policy(trials: list[Trial]) -> dict[str, Trial | None]:
  """The largest fitting compile of each policy (None: nothing fitted)."""
  out = {}
  for t in trials:
    best = out.get(t.policy)
    if t.fits and (best is None or t.per_chip > best.per_chip):
      out[t.policy] = t
    else:
      out.setdefault(t.policy, None)
  return out


def _format_fit(trials: list[Trial], predicted_next: dict, shards: int, hbm_gib: float) -> str:
  lines = [f"fit search, compiled (HBM {hbm_gib:.2f} GiB per chip, {shards} batch shards):",
           f"  {'remat policy':<34}{'per-chip batch':>15}{'global batch':>14}{'GiB':>8}"
           f"{'compile s':>11}"]
  for t in trials:
    gib = f"{t.used / GIB:8.2f}" if t.fits else f"{'OOM':>8}"
    lines.append(f"  {t.policy:<34}{t.per_chip:>15}{t.per_chip * shards:>14}{gib}"
                 f"{t.seconds:>11.0f}")
  for policy, best in best_per_policy(trials).items():
    line = f"  largest per-chip batch that fits with remat {policy!r}: "
    if best is None:
      lines.append(line + "none, down to 1")
      continue
    line += f"{best.per_chip} (global {best.per_chip * shards}, {best.used / GIB:.2f} GiB)"
    if policy in predicted_next:
      nxt, b = predicted_next[policy]
      line += f"; {nxt} predicted at {b / GIB:.1f} GiB, not compiled"
    lines.append(line)
  return "\n".join(lines)


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
      print(f"libtpu is not installed (pip install -r requirements-tpu.txt): "
            f"estimating {topology} on {n} CPU devices", flush=True)
    jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise app.UsageError(f"{n} devices requested, but this process has {len(devices)} CPU "
                           "devices (the backend was initialised with fewer)")
    devices = devices[:n]
    label = f"CPU estimate on {n} fake CPU devices (TPU/GPU layouts and fusion differ)"
  t0 = time.perf_counter()
  try:
    mesh, compiled = compile_step(config, devices)
  except jax.errors.JaxRuntimeError as e:
    if not (on_tpu and "RESOURCE_EXHAUSTED" in str(e)):
      raise
    mesh, compiled = sharding.make_mesh(config.mesh, devices), None
    print(f"compile-ahead: {config.variant} at global batch {config.batch_size} does NOT fit "
          f"{topology}: {str(e).splitlines()[0][:300]}", flush=True)
  seconds = time.perf_counter() - t0
  shipped = None
  if compiled is not None:
    report = memory_report(compiled, peak=on_tpu)
    print(_format(config, mesh, report, label, hbm), flush=True)
    if hbm is not None:
      used = used_bytes(report)
      shipped = Trial(config.model.remat_policy,
                      max(int(config.batch_size) // batch_shards(config, mesh), 1),
                      used if used <= hbm * GIB else None, report["temporaries"], seconds)
  if on_tpu and hbm is not None and _FIT.value:
    policies = list(_FIT_POLICIES.value) or list(dict.fromkeys(
        (config.model.remat_policy, "full")))
    for p in policies:
      layers.check_remat_policy(p)
    trials, predicted_next = fit_search(config, devices, hbm, policies, first=shipped,
                                        max_per_chip=_FIT_MAX.value,
                                        log=lambda m: print(m, flush=True))
    print(_format_fit(trials, predicted_next, batch_shards(config, mesh), hbm), flush=True)


if __name__ == "__main__":
  app.run(main)
