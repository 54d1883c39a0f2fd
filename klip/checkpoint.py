"""Orbax checkpoints: train state + data position in one step directory, async, keep-N.

A process killed mid-save leaves nothing that `latest_step` would report: on a local disk Orbax
writes each step to a temporary directory and renames it when complete; on GCS (a gs://
workdir, written natively through TensorStore), where a directory rename is a copy of every
object, it writes the step in place and marks it complete with one last object
(commit_success.txt), and only marked steps are listed. The state is saved as a pure
dict of arrays and restored onto whatever shardings the caller asks for, so a run can resume on
another mesh or device count.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from klip import distributed
from klip import paths


class CheckpointMismatch(ValueError):
  """A checkpoint saved by another model (parameter names or shapes differ from the config's)."""


class NoRestorableCheckpoint(RuntimeError):
  """Every step of a checkpoints directory failed to read."""


class SaveFailed(RuntimeError):
  """A checkpoint save did not complete (its step directory stays temporary, never listed)."""

  def __init__(self, directory: str, error: Exception):
    super().__init__(f"a checkpoint save under {directory} failed: {_reason(error)}")
    self.reason = _reason(error)


def abstract_pure(state, shardings):
  """ShapeDtypeStructs (with target shardings) in the pure-dict layout that is saved."""
  pure_state = nnx.to_pure_dict(state)
  pure_shardings = nnx.to_pure_dict(shardings)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      pure_state, pure_shardings)


def _row_sharded(x: np.ndarray) -> jax.Array:
  """x as a global array split by rows over every device of the run (rows padded with zeros to
  a multiple of the device count): each process writes only its devices' rows."""
  devices = jax.devices()
  x = np.concatenate([x, np.zeros(((-len(x)) % len(devices), *x.shape[1:]), x.dtype)])
  sharding = NamedSharding(Mesh(np.array(devices), ("rows",)), PartitionSpec("rows"))
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Checkpointer:
  """A CheckpointManager over DIR/checkpoints with items 'state', 'data' and, for SCIO runs,
  'scio' (the pair tables' JSON part) and 'scio_rows' (their columns, sharded by rows:
  `klip/scio/table.py`)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool, keep_period: int = 0):
    """keep: the newest steps kept; keep_period: steps divisible by it are never deleted (the
    eval job's steps, 0: none)."""
    self.directory = str(epath.Path(paths.resolve(workdir)) / "checkpoints")
    _quiet_orbax_echoes()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None,
                                             create=True, enable_async_checkpointing=async_save),
        item_names=("state", "data", "scio", "scio_rows"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data: dict, tables=None) -> None:
    """Saves state and data position, and the SCIO tables if given (`table.Tables`: its JSON
    part as is, its columns as arrays sharded by rows)."""
    items = {"state": ocp.args.StandardSave(nnx.to_pure_dict(state)),
             "data": ocp.args.JsonSave(data)}
    if tables is not None:
      meta, columns = tables.parts()
      items["scio"] = ocp.args.JsonSave(meta)
      items["scio_rows"] = ocp.args.PyTreeSave(jax.tree.map(_row_sharded, columns))
    try:  # also where the previous asynchronous save reports its failure
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  # whatever the writer raises
      raise SaveFailed(self.directory, e) from e

  def newest_data(self) -> dict | None:
    """The data item (step, examples seen, seed, batch, schedule) of the newest step whose
    data item reads, or None when there is no step."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self._manager.restore(step, args=ocp.args.Composite(
            data=ocp.args.JsonRestore())).data
      except Exception:  # pylint: disable=broad-except
        continue  # a damaged step: restore_newest says why when it reaches it
    return None

  def restore_newest(self, state_template, shardings, *, any_process=bool):
    """(step, state, data) of the newest step that restores, or None when there is no step.

    A step that fails to read (a missing or truncated file) is moved to
    DIR/checkpoints_skipped/ with one line that says why, and the step before it is tried; a
    step saved by another model raises CheckpointMismatch (older steps would too), and a
    directory whose every step fails raises NoRestorableCheckpoint. `any_process(failed)`
    agrees on a failure across processes, so that all of them resume from the same step.
    """
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      error = None
      try:
        self.check_matches(step, state_template)
        state, data = self.restore(step, state_template, shardings)
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except  # whatever the reader raises
        error = e
      if not any_process(error is not None):
        return step, state, data
      self._set_aside(step, error)
    if epath.Path(self._skipped).is_dir():
      raise NoRestorableCheckpoint(
          f"no checkpoint step under {self.directory} restores; the damaged steps are in "
          f"{self._skipped}. Start a new --workdir, or move a step back to resume from it.")
    return None

  @property
  def _skipped(self) -> str:
    return set_aside_dir(self.directory)

  def _set_aside(self, step: int, error: Exception | None) -> None:
    why = _reason(error) if error is not None else "it failed to read in another process"
    dest = epath.Path(self._skipped) / str(step)
    print(f"checkpoint step {step} does not restore ({why}); moved to {dest}, trying the "
          "step before it", flush=True)
    if jax.process_index() == 0:
      if dest.exists():
        dest.rmtree()
      # One rename locally; on GCS a move (a copy and a delete) of each object on its own, not
      # atomic: a kill midway leaves part of the damaged step behind, listed only while its
      # commit_success.txt is there (then the next resume moves it again), else unlisted and
      # written over when the run saves that step again.
      paths.move_dir(epath.Path(self.directory) / str(step), dest)
    distributed.wait_for_all(f"klip_skip_step_{step}")
    self._manager.reload()

  def check_matches(self, step: int, state_template) -> None:
    """Raises CheckpointMismatch naming the parameters whose names or shapes differ."""
    item = epath.Path(self.directory) / str(step) / "state"
    saved = _shapes(ocp.PyTreeCheckpointHandler().metadata(item).tree)
    wanted = _shapes(nnx.to_pure_dict(state_template))
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if differ:
      shown = "; ".join(f"{k}: {saved.get(k, 'absent')} saved, {wanted.get(k, 'absent')} in "
                        "this config" for k in differ[:3])
      raise CheckpointMismatch(
          f"checkpoint step {step} in {self.directory} was saved by another model ({shown}"
          f"{f'; {len(differ) - 3} more' if len(differ) > 3 else ''}). Resume with the config "
          "the run was made with (its config.json), or train a new --workdir with "
          "--config.init.checkpoint set to this run.")

  def restore(self, step: int, state_template, shardings):
    """Restores `step` into the structure of `state_template` with `shardings`."""
    target = abstract_pure(state_template, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda x: x, state_template)
    nnx.replace_by_pure_dict(state, restored.state)
    return state, restored.data

  def restore_table(self, step: int) -> tuple[dict, dict] | None:
    """The SCIO tables saved with `step` as (JSON part, columns: host arrays, every row on
    every process), for `table.Tables.from_parts`; None if that step has none."""
    root = epath.Path(self.directory) / str(step)
    if not (root / "scio").is_dir():
      return None
    if not (root / "scio_rows").is_dir():  # a step written before the columns were arrays
      return self._manager.restore(step, args=ocp.args.Composite(
          scio=ocp.args.JsonRestore())).scio, {}
    tree = ocp.PyTreeCheckpointHandler().metadata(root / "scio_rows").tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        scio=ocp.args.JsonRestore(), scio_rows=ocp.args.PyTreeRestore(restore_args=as_numpy)))
    return restored.scio, restored.scio_rows

  def wait(self) -> None:
    """Until the asynchronous save in flight has finished; SaveFailed if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(self.directory, e) from e

  def close(self) -> None:
    self._manager.close()


def _reason(error: Exception) -> str:
  """The first line of the innermost cause ("ValueError: ... Truncated Zstd-compressed ...")."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _from_orbax(exc, obj=None) -> bool:
  """Whether an error is an echo of a failed restore or save (see `_quiet_orbax_echoes`): the
  asyncio loop's "Event loop is closed", a full disk, or an error raised through Orbax's code."""
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
    return True
  tb = getattr(exc, "__traceback__", None)
  files = [f.f_code.co_filename for f, _ in traceback.walk_tb(tb)] if tb is not None else []
  return any(_ORBAX in f for f in files) or _ORBAX in repr(obj)


_ORBAX = os.sep + "orbax" + os.sep


class _EchoFilter(logging.Filter):
  def filter(self, record):
    return not (record.exc_info and _from_orbax(record.exc_info[1])
                or record.exc_info and _ORBAX in record.pathname)


def _quiet_orbax_echoes() -> None:
  """Drops the echoes of a failed restore or save. A restore that fails abandons the step's
  other array reads, and a save that fails (a full disk) fails in every writer thread; each
  then reports itself from TensorStore's threads, the asyncio loop ('Event loop is closed',
  'Task exception was never retrieved') and Orbax's log: hundreds of tracebacks around the one
  line that says what happened, which the caller gets (the set-aside line of `restore_newest`,
  SaveFailed at the next `save` or `wait`). Other errors pass through."""
  if getattr(sys.unraisablehook, "klip_quiet", False):
    return
  unraisable, excepthook, thread_hook = sys.unraisablehook, sys.excepthook, threading.excepthook

  def quiet_unraisable(u):
    if not _from_orbax(u.exc_value, u.object):
      unraisable(u)

  def quiet_excepthook(kind, value, tb):  # TensorStore's callbacks print through it
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      excepthook(kind, value, tb)

  def quiet_thread_hook(args):
    if not _from_orbax(args.exc_value):
      thread_hook(args)

  quiet_unraisable.klip_quiet = True
  sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
  threading.excepthook = quiet_thread_hook
  for name in ("asyncio", "absl"):
    logging.getLogger(name).addFilter(_EchoFilter())


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """Leaf path ("model/image/posemb") -> shape, for saved metadata and live state alike."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "idx", k)))
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def read_params(path: str) -> dict:
  """The model parameters of a checkpoint as host arrays (pure dict), for initialisation.

  `path` is a workdir (its latest step is used), a checkpoints directory or a step directory,
  local or gs://.
  """
  path = epath.Path(paths.resolve(path))
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not (path / "state").is_dir():
    manager = ocp.CheckpointManager(path, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {path}")
    path = path / str(step)
  item = path / "state"
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    # Onto one local device, whatever devices wrote it (a pod checkpoint on a laptop).
    tree = ckptr.metadata(item).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), tree)
    state = ckptr.restore(item, target)
  return jax.tree.map(np.asarray, state["model"])


def set_aside_dir(directory: str) -> str:
  """Where `restore_newest` moves the damaged steps of a checkpoints directory."""
  return directory.rstrip("/") + "_skipped"


def set_aside_steps(directory: str) -> list[int]:
  """The steps of a checkpoints directory that were set aside as damaged, ascending."""
  path = epath.Path(set_aside_dir(directory))
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def complete_steps(directory: str) -> list[int]:
  """Steps under a checkpoints directory whose save has finished, ascending.

  Only finalised step directories count: Orbax writes into a temporary name and renames it
  when the save is complete, so a step being written is never listed. Nothing is created.
  """
  if not epath.Path(directory).is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def restore_model(directory: str, step: int, target: dict) -> dict:
  """The `model` subtree of a saved train state, restored onto `target`'s shardings.

  `target` is the abstract pure dict of the model (ShapeDtypeStructs with shardings, see
  `abstract_pure`); the optimizer and other items are not read.
  """
  item = epath.Path(directory) / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
        item={"model": target},
        restore_args=ocp.checkpoint_utils.construct_restore_args({"model": target}),
        partial_restore=True))
  return restored["model"]
