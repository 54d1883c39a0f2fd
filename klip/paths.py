"""Workdir files on a local disk or on Google Cloud Storage (`gs://BUCKET/PREFIX`).

Orbax and TensorStore write checkpoints to either natively; everything else the trainer and the
eval job keep in a workdir (config.json, metrics.jsonl, tokenizer.model, TensorBoard events, the
eval ledger and reports) goes through `etils.epath.Path` (gs:// through gcsfs) and the writes
below, which are atomic on both:

- local: a file is written to NAME.tmp and renamed over NAME (`os.replace`), so a reader or a
  kill sees the old file or the new one, never part of one.
- GCS: one object write is atomic (the object appears whole when its upload completes), and
  GCS has no rename (fsspec's is a copy and a delete), so a file is written once, in place.

A GCS object cannot be appended to: `append` there rewrites the whole object with the new text
at its end, one atomic write, so a row is never torn; each write costs the file's size (a long
run's metrics.jsonl is a few MB).
"""

from __future__ import annotations

import importlib
import os

import fsspec
from etils import epath

# What gs:// paths need, each with the package that provides it: etils.epath reads and writes
# gs:// through gcsfs; Orbax (deleting rotated steps) and tensorboardX use google-cloud-storage.
GCS_MODULES = (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage"))

# gcsfs keeps every directory listing for the life of its process by default, so a process
# would never see objects that another process wrote after its first look (an eval job polling
# for new checkpoint steps, a resume after another process's save): KLIP lists afresh each time.
# A default for the filesystem etils creates, which must be set before its first gs:// use.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


class MissingPackage(RuntimeError):
  """A gs:// path on an installation that cannot reach GCS."""


def is_gcs(path) -> bool:
  return os.fspath(path).startswith("gs://")


def resolve(path) -> str:
  """An absolute local path, or a gs:// URL as it is (`os.path.abspath` would turn it into
  CWD/gs:/BUCKET/...)."""
  return os.fspath(path) if is_gcs(path) else os.path.abspath(path)


def require(path) -> None:
  """Raises MissingPackage, one line naming the package to install, when `path` is on GCS and
  a module that GCS needs does not import."""
  if not is_gcs(path):
    return
  for module, package in GCS_MODULES:
    try:
      importlib.import_module(module)
    except ImportError:
      raise MissingPackage(f"{os.fspath(path)} is on Google Cloud Storage, which needs the "
                           f"{package} package: pip install {package} (pinned in "
                           "requirements.txt)") from None


def write_atomic(path, data: str | bytes) -> None:
  """Writes a whole file so that no reader or kill sees part of it (see the module doc)."""
  path = epath.Path(path)
  if is_gcs(path):
    _write(path, data)
    return
  tmp = path.parent / (path.name + ".tmp")
  _write(tmp, data)
  tmp.replace(path)


def append(path, text: str) -> None:
  """Adds `text` at the end of a file (creating it); on GCS the object is rewritten whole."""
  path = epath.Path(path)
  if is_gcs(path):
    _write(path, (path.read_text() if path.exists() else "") + text)
    return
  with path.open("a") as f:
    f.write(text)


def move_dir(src, dst) -> None:
  """Moves directory `src` to `dst` (which must not exist), creating dst's parent. Locally one
  rename; on GCS each object is moved on its own (GCS's object move, or a copy and a delete):
  not atomic, so a kill midway leaves part of the objects in each place (the caller moves only
  a step already known to be damaged)."""
  src, dst = epath.Path(src), epath.Path(dst)
  if is_gcs(src):
    # gcsfs through the instance epath uses, so that epath's listings see the move.
    epath.backend.fsspec_backend.fs(os.fspath(src)).mv(os.fspath(src), os.fspath(dst),
                                                       recursive=True)
    return
  dst.parent.mkdir(parents=True, exist_ok=True)
  src.replace(dst)


def _write(path: epath.Path, data: str | bytes) -> None:
  if isinstance(data, str):
    path.write_text(data)
  else:
    path.write_bytes(data)
