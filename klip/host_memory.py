"""Huge pages for the host memory XLA:CPU allocates: glibc's `glibc.malloc.hugetlb` tunable.

XLA:CPU gives each execution of a compiled step one buffer for all of its temporaries and frees
it when the step ends. The buffer is far above glibc's mmap threshold, so every step maps a
fresh region that the kernel faults in and zeroes 4 KiB at a time: for a ViT-Ti step, hundreds
of thousands of page faults per step (bench/README.md, B1, has the measurements). With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35 or newer) glibc advises transparent huge
pages on its mappings, which the kernel's usual THP mode ("madvise") honours, and the faults
fall by two orders of magnitude. (In mode "always" every large mapping gets huge pages without
advice; in "never" none does.)

glibc reads tunables once, when the process starts, so whoever starts Python sets it: the
Makefile exports it, launch/local.sh passes it to each process, and `environ()` sets a child's
environment with or without it (bench/run_all.py, the open_clip workers). The trainer and the
evaluators warn when they run on CPU without it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def enabled(env: Mapping[str, str] | None = None) -> bool:
  """Whether `env` (default: this process's) asks glibc for huge pages."""
  env = os.environ if env is None else env
  return SETTING in env.get("GLIBC_TUNABLES", "").split(":")


def environ(env: Mapping[str, str] | None = None, on: bool = True) -> dict[str, str]:
  """A copy of `env` (default: this process's) with the setting added (`on`) or removed.

  Other tunables are kept, and so is a `glibc.malloc.hugetlb` value the caller chose (on).
  """
  env = dict(os.environ if env is None else env)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  chosen = [t for t in tunables if t.startswith(TUNABLE + "=")]
  if on and not chosen:
    tunables.append(SETTING)
  elif not on:
    tunables = [t for t in tunables if t not in chosen]
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  else:
    env.pop("GLIBC_TUNABLES", None)
  return env


def _thp_mode() -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'), None where it cannot be read."""
  try:
    with open(_THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def advice(backend: str, env: Mapping[str, str] | None = None) -> str | None:
  """A one-line warning when a CPU run would gain from the setting and lacks it, else None."""
  if backend != "cpu" or enabled(env):
    return None
  libc, version = platform.libc_ver()
  if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
    return None  # the tunable does not exist there
  if _thp_mode() != "madvise":
    return None  # "always" gives huge pages without advice, "never" refuses them
  return (f"GLIBC_TUNABLES lacks {SETTING}: each XLA:CPU step faults its temporaries in 4 KiB "
          f"pages, which slows every step (bench/README.md, B1); start Python with "
          f"GLIBC_TUNABLES={SETTING} (the Makefile and launch/local.sh do)")
