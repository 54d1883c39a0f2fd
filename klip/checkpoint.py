"""Orbax checkpoints: train state + data position in one step directory, async, keep-N.

Orbax writes each step to a temporary directory and renames it when complete, so a process
killed mid-save leaves nothing that `latest_step` would report. The state is saved as a pure
dict of arrays and restored onto whatever shardings the caller asks for, so a run can resume on
another mesh or device count.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def abstract_pure(state, shardings):
  """ShapeDtypeStructs (with target shardings) in the pure-dict layout that is saved."""
  pure_state = nnx.to_pure_dict(state)
  pure_shardings = nnx.to_pure_dict(shardings)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      pure_state, pure_shardings)


class Checkpointer:
  """A CheckpointManager over DIR/checkpoints with items 'state', 'data' and, for SCIO runs,
  'scio' (the pair tables, JSON)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "scio"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data: dict, table: dict | None = None) -> None:
    """Saves state and data position, and the SCIO tables (JSON-compatible) if given."""
    items = {"state": ocp.args.StandardSave(nnx.to_pure_dict(state)),
             "data": ocp.args.JsonSave(data)}
    if table is not None:
      items["scio"] = ocp.args.JsonSave(table)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, state_template, shardings):
    """Restores `step` into the structure of `state_template` with `shardings`."""
    target = abstract_pure(state_template, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda x: x, state_template)
    nnx.replace_by_pure_dict(state, restored.state)
    return state, restored.data

  def restore_table(self, step: int) -> dict | None:
    """The SCIO tables saved with `step`, or None if that step has none."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "scio")):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        scio=ocp.args.JsonRestore())).scio

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def read_params(path: str) -> dict:
  """The model parameters of a checkpoint as host arrays (pure dict), for initialisation.

  `path` is a workdir (its latest step is used), a checkpoints directory or a step directory.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(os.path.join(path, "state")):
    manager = ocp.CheckpointManager(path, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {path}")
    path = os.path.join(path, str(step))
  item = os.path.join(path, "state")
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    # Onto one local device, whatever devices wrote it (a pod checkpoint on a laptop).
    tree = ckptr.metadata(item).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), tree)
    state = ckptr.restore(item, target)
  return jax.tree.map(np.asarray, state["model"])


def complete_steps(directory: str) -> list[int]:
  """Steps under a checkpoints directory whose save has finished, ascending.

  Only finalised step directories count: Orbax writes into a temporary name and renames it
  when the save is complete, so a step being written is never listed. Nothing is created.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def restore_model(directory: str, step: int, target: dict) -> dict:
  """The `model` subtree of a saved train state, restored onto `target`'s shardings.

  `target` is the abstract pure dict of the model (ShapeDtypeStructs with shardings, see
  `abstract_pure`); the optimizer and other items are not read.
  """
  item = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
        item={"model": target},
        restore_args=ocp.checkpoint_utils.construct_restore_args({"model": target}),
        partial_restore=True))
  return restored["model"]
