"""The train state (model, optimizer, skipped-update counter), created already sharded."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klip import optim
from klip import sharding
from klip.model import two_tower


class Queue(nnx.Variable):
  """A feature queue of the momentum encoders (not a parameter: never differentiated)."""


class TrainState(nnx.Module):
  """Everything a step updates. `nonfinite` counts updates skipped for non-finite values.

  With `loss.momentum.enabled`: `momentum`, an exponential moving average of the model (same
  initialisation), and unit-norm feature queues of its image and text embeddings.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.model = two_tower.Model(config.model, rngs=rngs)
    self.optimizer = optim.optimizer(self.model, config)
    self.nonfinite = nnx.Variable(jnp.zeros((), jnp.int32))
    m = config.loss.momentum
    if m.enabled:
      self.momentum = two_tower.Model(config.model, rngs=nnx.Rngs(config.seed))
      shape = (m.queue_size, config.model.embed_dim)
      key_i, key_t = jax.random.split(jax.random.key(config.seed + 1))
      unit = lambda k: two_tower.l2_normalize(jax.random.normal(k, shape))
      self.image_queue = Queue(unit(key_i))
      self.text_queue = Queue(unit(key_t))
      self.queue_ptr = Queue(jnp.zeros((), jnp.int32))


def abstract(config):
  """(graphdef, abstract state) without allocating anything."""
  with nnx.use_eager_sharding(False):
    return nnx.split(nnx.eval_shape(lambda: TrainState(config, rngs=nnx.Rngs(config.seed))))


def create(config, mesh, rules):
  """Returns (graphdef, state, shardings) with the state initialised directly on its shards.

  Call it outside a `jax.set_mesh` context: the shardings name the mesh explicitly.
  """
  graphdef, abstract_state = abstract(config)
  shardings = sharding.state_shardings(abstract_state, mesh, rules)

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.split(TrainState(config, rngs=nnx.Rngs(config.seed)))[1]

  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def describe(config) -> dict:
  """Parameter counts (the two towers, the fusion path, the decoder) and the bytes of the train
  state held by each device."""
  mesh = sharding.make_mesh(config.mesh)
  _, abstract_state = abstract(config)
  params = nnx.state(abstract_state["model"], nnx.Param)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  parts = {name: count(params[name]) for name in params}
  flat = nnx.to_flat_state(params)
  cross = sum(math.prod(v.get_value().shape) for path, v in flat
              if path[0] == "text" and "cross" in "/".join(map(str, path)))
  shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
  per_device = 0
  for leaf, sh in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
    per_device += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  two_tower = parts["image"] + parts["text"] - cross
  return {"parameters": count(params), "parts": parts, "two_tower": two_tower,
          "fusion_cross_attention": cross, "mesh": dict(mesh.shape),
          "state_bytes_per_device": per_device}
