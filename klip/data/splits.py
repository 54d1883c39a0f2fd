"""Scene-level train/val/test splits: neighbouring chips of one scene never straddle splits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLITS = ("train", "val", "test")


def _rank(scene_id: str) -> str:
  return hashlib.sha256(scene_id.encode()).hexdigest()


def assign(scene_ids: Iterable[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
  """Maps each distinct scene id to a split.

  Scenes are ordered by a hash of their id (stable, independent of input order); the first
  round(test_fraction * n) go to test, the next round(val_fraction * n) to val, the rest to
  train. At least one scene stays in train.
  """
  scenes = sorted(set(scene_ids), key=_rank)
  if not 0 <= val_fraction + test_fraction < 1:
    raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got "
                     f"{val_fraction} + {test_fraction}")
  n_test = round(test_fraction * len(scenes))
  n_val = round(val_fraction * len(scenes))
  n_test = min(n_test, max(len(scenes) - 1, 0))
  n_val = min(n_val, max(len(scenes) - 1 - n_test, 0))
  out = {}
  for i, scene in enumerate(scenes):
    out[scene] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
  return out
