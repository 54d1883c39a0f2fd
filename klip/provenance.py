"""DIR/config.json: the run's config and where it came from; refuses mismatched resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import ml_collections
from etils import epath

from klip import paths

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


# Config fields added after runs were recorded without them, each with the value such a run had
# in effect. `migrated` fills them in, so an old config.json reads as today's schema and the
# model and SCIO code read every field directly: a misspelt field fails where it is read.
_ADDED = (
    ("model.text.fusion_layers", lambda c: c["model"]["text"]["depth"]),
    ("model.decoder", lambda c: {"depth": c["model"]["text"]["depth"]}),
    ("model.decoder.context", lambda c: "caption"),
    ("model.attention", lambda c: "auto"),
    ("model.stem", lambda c: "patch"),
    ("model.pool", lambda c: "cls"),
    ("model.posemb", lambda c: "learned"),
    ("model.match_cosine", lambda c: False),
    ("scio.fill_candidates", lambda c: 0),
    ("scio.screen", lambda c: "leave_one_out"),
    ("scio.screen_candidates", lambda c: 8),
    # before per-field calibration every field used the absolute margins: no field calibrates
    ("scio.false_flag_rate", lambda c: 0.02),
    ("scio.calibration_min_rows", lambda c: 2**31 - 1),
    ("loss.clause_rivals", lambda c: 0),
    ("loss.reconstruct_mask_p", lambda c: 0.5),
    ("loss.reconstruct_random_p", lambda c: 0.1),
    ("checkpoint.keep_period", lambda c: 0),
)


def migrated(config: dict) -> dict:
  """A recorded config (the JSON of config.json) with the fields of `_ADDED` it lacks filled
  in; `config` is left as it is."""
  out = json.loads(json.dumps(config))
  for dotted, value in _ADDED:
    *parents, leaf = dotted.split(".")
    node = out
    for key in parents:
      node = node.get(key)
      if not isinstance(node, dict):
        break
    else:
      if leaf not in node:
        node[leaf] = value(out)
  return out


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config recorded in WORKDIR/config.json, in today's schema (`migrated`)."""
  previous = _previous(workdir)
  if previous is None:
    raise FileNotFoundError(f"{epath.Path(workdir) / 'config.json'} not found: {workdir} is "
                            "not a KLIP training workdir")
  return ml_collections.ConfigDict(migrated(previous["config"]))


def _previous(workdir: str) -> dict | None:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  return json.loads(path.read_text())


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
    paths.write_atomic(epath.Path(workdir) / "config.json", json.dumps(entry, indent=1))
  return entry
