"""DIR/eval/ledger.json: the checkpoint steps this eval config has finished, so a restarted or
concurrent watcher never evaluates a step twice.

A step enters the ledger only after its metrics and report are written: a job killed while
evaluating a step evaluates it again when restarted. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
import time


class Ledger:

  def __init__(self, path: str, *, write: bool = True):
    """write: whether `mark` writes the file (in a multi-process job, process 0 alone)."""
    self.path = path
    self.write = write
    self._done: dict[int, dict] = {}
    if os.path.exists(path):
      with open(path) as f:
        payload = json.load(f)
      self._done = {int(k): v for k, v in payload.get("done", {}).items()}

  @property
  def done(self) -> list[int]:
    return sorted(self._done)

  def __contains__(self, step: int) -> bool:
    return step in self._done

  def mark(self, step: int, **info) -> None:
    self._done[step] = dict(info, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if not self.write:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"done": {str(k): v for k, v in sorted(self._done.items())}}, f, indent=1)
    os.replace(tmp, self.path)
