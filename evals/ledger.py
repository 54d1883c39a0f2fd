"""DIR/eval/ledger.json: the checkpoint steps this eval config has finished, so a restarted or
concurrent watcher never evaluates a step twice, and the steps it missed, with why.

A step enters the ledger only after its metrics and report are written: a job killed while
evaluating a step evaluates it again when restarted. A step the training run saved but deleted
(checkpoint rotation) or set aside (damaged) before it was evaluated is entered as missed, so a
gap in the evaluated steps is always explained. Writes are atomic (klip/paths.py: a temp file
and a rename locally, one object write on GCS).
"""

from __future__ import annotations

import json
import time

from etils import epath

from klip import paths


class Ledger:

  def __init__(self, path: str, *, write: bool = True):
    """write: whether `mark` writes the file (in a multi-process job, process 0 alone)."""
    self.path = epath.Path(path)
    self.write = write
    self._done: dict[int, dict] = {}
    self._missed: dict[int, str] = {}
    if self.path.exists():
      payload = json.loads(self.path.read_text())
      self._done = {int(k): v for k, v in payload.get("done", {}).items()}
      self._missed = {int(k): v for k, v in payload.get("missed", {}).items()}

  @property
  def done(self) -> list[int]:
    return sorted(self._done)

  @property
  def missed(self) -> dict[int, str]:
    """Step -> why it could not be evaluated."""
    return dict(sorted(self._missed.items()))

  def __contains__(self, step: int) -> bool:
    """Whether the step is settled: evaluated, or missed."""
    return step in self._done or step in self._missed

  def mark(self, step: int, **info) -> None:
    self._done[step] = dict(info, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    self._missed.pop(step, None)
    self._save()

  def mark_missed(self, step: int, reason: str) -> None:
    self._missed[step] = reason
    self._save()

  def _save(self) -> None:
    if not self.write:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(self.path, json.dumps(
        {"done": {str(k): v for k, v in sorted(self._done.items())},
         "missed": {str(k): v for k, v in sorted(self._missed.items())}}, indent=1))
