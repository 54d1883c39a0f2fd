"""Multi-process JAX from the environment: one code path from a laptop to a pod.

`initialize()` runs before anything touches devices and picks the first that applies:

  explicit  --coordinator_address, --num_processes and --process_id (GPU clusters without
            SLURM, and the local multi-process launcher `launch/local.sh`);
  slurm     SLURM_NTASKS > 1: rank and size from SLURM, the coordinator from
            KLIP_COORDINATOR_ADDRESS (set by `launch/slurm.sbatch`) or else the first node of the
            step; one device per process when a node runs several tasks;
  tpu       a Cloud TPU VM (TPU device files and libtpu present): JAX reads workers and slices
            from the TPU metadata;
  single    one process, nothing to join.

`num_cpu_devices` gives each process that many CPU devices (the local CPU mode). Joining is
bounded by `timeout_s`, and a process that stops sending heartbeats for `heartbeat_s` fails the
others (JAX aborts them naming the dead task), so a dead worker never leaves the rest hanging.
The trainer and the eval job take the same flags (defined here) and call `initialize_from_flags`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
from collections.abc import Mapping

import jax
from absl import flags

from klip import sharding

# Multi-process runs: SLURM and Cloud TPU need none of these.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (explicit mode).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (explicit mode).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (explicit mode).")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0,
                                        "CPU devices per process (local CPU mode; 0: default).")
_JOIN_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300,
                                     "Seconds to wait for all processes to join.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout_s", 60,
                                          "Seconds without heartbeats before a process is dead.")

# SLURM: a port from the job id in the ephemeral range, as JAX's own SLURM detection picks.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 61440, 4096


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the others; `mode` is explicit, slurm, tpu or single."""
  mode: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def describe(self) -> str:
    if self.mode == "tpu":
      return "Cloud TPU VM: workers and slices from the TPU metadata"
    text = (f"{self.mode}: process {self.process_id} of {self.num_processes}, "
            f"coordinator {self.coordinator_address}")
    if self.local_device_ids is not None:
      text += f", local devices {list(self.local_device_ids)}"
    return text


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
  m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist.strip())
  if not m:
    raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
  return m.group(1) + (m.group(2) or "")


def on_cloud_tpu_vm() -> bool:
  """TPU chips are attached (v4/v5p: /dev/accel*, v5e/v6e: /dev/vfio/N) and libtpu is importable."""
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, env: Mapping[str, str] | None = None,
         cloud_tpu: bool | None = None) -> Plan:
  """Decides how to join (see the module docstring); validates the numbers it is given."""
  env = os.environ if env is None else env
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) < len(explicit):
    missing = [k for k in explicit if k not in given]
    raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: pass all three "
                     "or none")
  if given:
    return _checked(Plan("explicit", coordinator_address, num_processes, process_id))
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
    return _checked(_slurm(env))
  if on_cloud_tpu_vm() if cloud_tpu is None else cloud_tpu:
    return Plan("tpu")
  return Plan("single", num_processes=1, process_id=0)


def _slurm(env: Mapping[str, str]) -> Plan:
  ntasks, nnodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", "1"))
  address = env.get("KLIP_COORDINATOR_ADDRESS")
  if not address:
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    port = _SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % _SLURM_PORT_SPAN
    address = f"{first_host(nodes)}:{port}"
  # Several tasks on a node: one device each, unless the launcher already narrowed visibility.
  visible = env.get("CUDA_VISIBLE_DEVICES", "")
  one_each = ntasks > nnodes and len([d for d in visible.split(",") if d]) != 1
  local = (int(env["SLURM_LOCALID"]),) if one_each else None
  return Plan("slurm", address, ntasks, int(env["SLURM_PROCID"]), local)


def _checked(p: Plan) -> Plan:
  if p.num_processes < 1:
    raise ValueError(f"num_processes must be at least 1, got {p.num_processes}")
  if not 0 <= p.process_id < p.num_processes:
    raise ValueError(f"process_id {p.process_id} is outside [0, {p.num_processes}) for "
                     f"num_processes {p.num_processes}")
  return p


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, num_cpu_devices: int = 0,
               timeout_s: int = 300, heartbeat_s: int = 60) -> Plan:
  """Joins the other processes (if any) before anything touches devices; returns the plan."""
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  p = plan(coordinator_address, num_processes, process_id)
  if p.mode == "single":
    return p
  print(f"klip.distributed: {p.describe()}; waiting up to {timeout_s} s for all processes "
        f"(heartbeat timeout {heartbeat_s} s)", flush=True)
  jax.distributed.initialize(
      coordinator_address=p.coordinator_address, num_processes=p.num_processes,
      process_id=p.process_id,
      local_device_ids=None if p.local_device_ids is None else list(p.local_device_ids),
      initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s)
  print(f"klip.distributed: joined as process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
  return p


def initialize_from_flags() -> Plan:
  """`initialize` with this module's command-line flags."""
  return initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                    num_cpu_devices=_NUM_CPU_DEVICES.value, timeout_s=_JOIN_TIMEOUT.value,
                    heartbeat_s=_HEARTBEAT_TIMEOUT.value)


def wait_for_all(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process reaches the barrier `name` (up to `timeout_s`): a barrier of
  the coordination service, not a device collective, so it outlasts work far longer than the
  collectives' own deadline (gloo's is 30 s), such as process 0 building a corpus."""
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def check_layout(mesh_config, num_devices: int, num_processes: int) -> dict[str, int]:
  """The mesh axis sizes, after checking that every process holds whole batch shards.

  Each process loads its own slice of the global batch, so the batch axes (slice, data, fsdp)
  must split into a multiple of the process count.
  """
  if num_devices % num_processes:
    raise ValueError(f"{num_devices} devices do not divide over {num_processes} processes")
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(mesh_config, num_devices)))
  shards = math.prod(shape[a] for a in ("slice", "data", "fsdp"))
  if shards % num_processes:
    raise ValueError(f"mesh {shape} splits the batch into {shards} shards, which do not divide "
                     f"over {num_processes} processes; give slice x data x fsdp a multiple of "
                     f"{num_processes}")
  return shape
