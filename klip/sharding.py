"""Meshes and logical-axis sharding rules (sharding is data, set in config).

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`);
activations are constrained with `constrain(x, ("batch", "length", "embed"))`. The config's
rules map logical names to mesh axes of the mesh ("slice", "data", "fsdp", "tensor"), where
"slice" is the DCN dimension of a multi-slice pod.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH = "batch"


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes (one may be -1: all remaining devices)."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or num_devices % known:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes MESH_AXES (all Auto) over `devices` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  if shape[0] > 1:  # multi-slice: the slice axis runs over DCN.
    per_slice = (1,) + shape[1:]
    dcn = (shape[0], 1, 1, 1)
    array = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
  else:
    array = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(array, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None], rules, shape=None, mesh=None) -> P:
  """Maps logical axis names to a PartitionSpec with `rules` ((name, mesh axes), ...).

  A mesh axis is used at most once per spec. With `shape` and `mesh`, a dimension that the
  mapped mesh axes do not divide is replicated instead (logged), so small test models still
  run on any mesh.
  """
  table = {name: axes for name, axes in rules}
  used, out = set(), []
  for dim, name in enumerate(logical):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh is not None:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % size:
        logging.info("replicating dim %d (%s, size %d): mesh axes %s of size %d do not divide it",
                     dim, name, shape[dim], axes, size)
        axes = ()
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def state_shardings(abstract_state, mesh, rules):
  """NamedShardings for an NNX state whose Variables carry logical `out_sharding` names.

  The names are read from each Variable's metadata and mapped with `rules` here (not through
  flax's rule context, which leaves unmapped names in place).
  """

  def to_sharding(var):
    shape = var.get_value().shape
    names = tuple(var.get_metadata().get("out_sharding") or ())
    names = names + (None,) * (len(shape) - len(names))
    return var.replace(NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh)))

  return jax.tree.map(to_sharding, abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
  """Shards the leading (batch) dimension of an input array."""
  return NamedSharding(mesh, logical_to_spec((BATCH,) + (None,) * (ndim - 1), rules))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh or without rules."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules, x.shape, mesh))
