"""Fault injection for the fault matrix (tests/test_faults.py), from one environment variable,
so that no config field or flag of a production run carries a test hook.

  KLIP_FAULTS="kill_at_step=12"                 comma-separated NAME=STEP pairs

  kill_at_step            SIGKILL before the step after STEP runs (the trainer's loop top)
  kill_in_save_at_step    SIGKILL while step STEP's asynchronous checkpoint save is in flight
  kill_in_pass_at_step    SIGKILL inside the SCIO rescoring pass of step STEP (after a chunk)
  kill_in_eval_at_step    SIGKILL in the eval job once step STEP's metrics row is written and
                          before its ledger entry (the worst moment for a duplicate)
  fill_disk_at_step       fill the workdir's file system just before step STEP is saved
  nonfinite_loss_at_step  the loss of step STEP is NaN (traced into the train step)

Unset, every query answers "no fault"; a name not listed above is an error, so a misspelt fault
never passes as a run without one.
"""

from __future__ import annotations

import os
import signal

ENV = "KLIP_FAULTS"
NAMES = ("kill_at_step", "kill_in_save_at_step", "kill_in_pass_at_step", "kill_in_eval_at_step",
         "fill_disk_at_step", "nonfinite_loss_at_step")
BALLAST = "klip_fault_ballast"  # the file fill_disk writes


def planned(name: str) -> int | None:
  """The step at which fault `name` is planned, or None."""
  if name not in NAMES:
    raise ValueError(f"unknown fault {name!r}; known: {NAMES}")
  spec = os.environ.get(ENV, "")
  faults = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, _, value = item.partition("=")
    if key not in NAMES or not value.lstrip("-").isdigit():
      raise ValueError(f"{ENV}={spec!r}: {item!r} is not NAME=STEP with NAME one of {NAMES}")
    faults[key] = int(value)
  return faults.get(name)


def at(name: str, step: int) -> bool:
  """Whether fault `name` is planned at `step`."""
  return planned(name) == step


def kill() -> None:
  """Dies like a preempted process: SIGKILL, no handler, nothing flushed."""
  os.kill(os.getpid(), signal.SIGKILL)


def fill_disk(directory: str) -> int:
  """Writes DIRECTORY/BALLAST until its file system is full; returns the bytes written."""
  written = 0
  with open(os.path.join(directory, BALLAST), "wb", buffering=0) as f:
    for size in (1 << 16, 1 << 10, 1):  # smaller blocks fill what a larger one could not
      try:
        while True:
          written += f.write(b"\0" * size)
      except OSError:  # ENOSPC: the point
        pass
  return written
