"""DIR/config.json: the run's config and where it came from; refuses mismatched resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "array_record",
             "tensorflow-datasets", "sentencepiece", "ml-collections", "numpy")


class ProvenanceMismatch(RuntimeError):
  pass


def git_commit() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for p in _PACKAGES:
    try:
      out[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      out[p] = "not installed"
  return out


def _previous(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check(workdir: str, config, *, dataset_fingerprint: str,
          tokenizer_fingerprint: str) -> None:
  """Refuses to resume a run made on other data or another tokenizer; writes nothing."""
  previous = _previous(workdir)
  if previous is None:
    return
  for key, now in (("dataset_fingerprint", dataset_fingerprint),
                   ("tokenizer_fingerprint", tokenizer_fingerprint)):
    if previous.get(key) not in (None, now):
      raise ProvenanceMismatch(
          f"{workdir} holds a run made with {key.split('_')[0]} fingerprint "
          f"{previous[key]}, but this run's is {now} ({config.data.dataset} under "
          f"{config.data.data_dir}). Resuming would mix data; use a new --workdir or the "
          "original dataset.")


def record(workdir: str, config, *, dataset_fingerprint: str, tokenizer_fingerprint: str,
           resumed_from: int | None, write: bool = True) -> dict:
  """Writes DIR/config.json, appending to its history.

  The trainer calls `check` before a resume and this once the resume has succeeded, so a
  refused or failed resume leaves the workdir's record as it was. Only the process with
  `write` (process 0) writes.
  """
  previous = _previous(workdir)
  entry = {
      "config": json.loads(config.to_json()),
      "git_commit": git_commit(),
      "versions": _versions(),
      "dataset_fingerprint": dataset_fingerprint,
      "tokenizer_fingerprint": tokenizer_fingerprint,
      "resumed_from_step": resumed_from,
      "history": (previous or {}).get("history", []) + [
          {"git_commit": git_commit(), "resumed_from_step": resumed_from,
           "total_steps": config.total_steps}],
  }
  if write:
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(entry, f, indent=1)
    os.replace(tmp, path)
  return entry
