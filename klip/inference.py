"""The jitted, sharded predictions of a model: the one harness of SCIO, evaluators and benchmarks.

`Inference` is built once from (graphdef, state shardings, mesh, logical rules) and jits each
`klip.predict` function once per input shape with explicit shardings: the state as given, the
batch over the mesh's batch axes. Every process calls the same predictions in the same order
(they are collectives). By default each hands in host numpy arrays of *its own rows* and gets
back its own rows of the outputs (what the SCIO pass needs: each process rescores its share of
the pair table); with `all_rows=True` each hands in the whole batch and gets all of the outputs
(what the evaluators need: each process holds the whole split and computes its metrics), while
computing only its share. With one process the two are the same. `Processes` exchanges host
values between the processes.

The jits take `compiler_options`: the SCIO pass compiles without XLA:CPU's YNNPACK fusions on
CPU (`scoring_options`); the evaluators keep XLA's defaults (bench/README.md measured both).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec as P

from klip import distributed
from klip import predict
from klip import sharding
from klip.data.caption import SEP

# XLA:CPU's YNNPACK fusions put a whole MLP sublayer (LayerNorm, both matmuls, GELU, residual)
# into one library graph: on tiny's scoring chunk (64 pairs x 9 texts x 128 tokens) its matmuls
# ran at 63-100 GFLOP/s against 150 for XLA's own dots. Train steps and the evaluators'
# embeddings are faster with them (bench/README.md has the measurements).
CPU_SCORING_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def scoring_options(mesh: jax.sharding.Mesh) -> dict | None:
  """The compiler options of the SCIO pass's jits on `mesh`'s platform."""
  return CPU_SCORING_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None


# ---------------------------------------------------------------------------------------------
# The predictions, as functions of (model, batch arrays): each output has the batch first.
# ---------------------------------------------------------------------------------------------
def features(model, images):
  """(embedding [n, E], pooled tokens [n, W] (`ViT.pool`), patch tokens [n, P, W], CLS token
  [n, W]) float32 of images."""
  zimg, tokens = predict.embed_images(model, images)
  tokens = tokens.astype(jnp.float32)
  return zimg, model.image.pool(tokens), tokens[:, 1:], tokens[:, 0]


def image_tokens(model, images):
  """ViT tokens [n, 1 + P, W] of images (the image side of matching and generation)."""
  return predict.embed_images(model, images)[1]


def variant_scores(model, images, texts):
  """(cosine, match) [n, V] of images [n, ...] against their V texts [n, V, L]; the image side
  runs once per image."""
  zimg, tokens = predict.embed_images(model, images)
  n, v, length = texts.shape
  s = predict.score(model, jnp.repeat(zimg, v, axis=0), jnp.repeat(tokens, v, axis=0),
                    texts.reshape(n * v, length))
  return s.cosine.reshape(n, v), s.match.reshape(n, v)


def variant_logprobs(model, images, texts):
  """Decoder log-likelihood [n, V] of each of the V [DEC]-first texts [n, V, L] of image n."""
  tokens = predict.embed_images(model, images)[1]
  n, v, length = texts.shape
  return predict.text_logprob(model, jnp.repeat(tokens, v, axis=0),
                              texts.reshape(n * v, length)).reshape(n, v)


def pair_scores(model, images, texts):
  """(cosine, match) [n] of each image with its one text [n, L]."""
  cosine, match = variant_scores(model, images, texts[:, None])
  return cosine[:, 0], match[:, 0]


_COMPILED = itertools.count()  # barrier names: every process compiles in the same order


class Processes:
  """The processes of a run, as the SCIO pass and the evaluators need them: which rows of a
  shared batch are this process's, and host values exchanged between all of them (each
  exchange is a collective: every process makes the same calls in the same order)."""

  def __init__(self):
    self.index, self.count = jax.process_index(), jax.process_count()

  def local_rows(self, global_batch: int) -> slice:
    """This process's rows of a batch of `global_batch` rows that every process holds."""
    per = self.local_batch(global_batch)
    return slice(self.index * per, (self.index + 1) * per)

  def local_batch(self, global_batch: int) -> int:
    """Rows each process hands in for a batch of `global_batch`."""
    if global_batch % self.count:
      raise ValueError(f"a batch of {global_batch} rows does not divide over "
                       f"{self.count} processes")
    return global_batch // self.count

  def share(self, n: int) -> range:
    """This process's contiguous share of n rows that the processes split between them (for
    work that every row needs once, such as reading a split's ids)."""
    return range(self.index * n // self.count, (self.index + 1) * n // self.count)

  def concat(self, x: np.ndarray, n: int) -> np.ndarray:
    """[n, ...]: every process's rows x of its `share(n)`, concatenated in process order."""
    if self.count == 1:
      return np.asarray(x)
    padded = np.zeros((-(-n // self.count), *np.shape(x)[1:]), np.asarray(x).dtype)
    padded[:len(x)] = x
    parts = self.gather(padded)
    return np.concatenate([part[:(p + 1) * n // self.count - p * n // self.count]
                           for p, part in enumerate(parts)])

  def gather(self, x: np.ndarray) -> np.ndarray:
    """[P, ...]: every process's host array x (the same shape and dtype on each), stacked in
    process order."""
    x = np.asarray(x)
    if self.count == 1:
      return x[None]
    mesh, replicate = self._process_mesh
    stacked = jax.make_array_from_process_local_data(NamedSharding(mesh, P("processes")),
                                                     x[None])
    return np.asarray(replicate(stacked))

  def gather_json(self, value) -> list:
    """Every process's JSON value, in process order."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = self.gather(np.array(data.size, np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    return [json.loads(bytes(blob[:n])) for blob, n in zip(self.gather(padded), sizes)]

  def any(self, flag: bool) -> bool:
    """Whether `flag` holds on any process (so that all take the same branch)."""
    return bool(self.gather(np.array(bool(flag))).any())

  @functools.cached_property
  def _process_mesh(self):
    """(a mesh with one row of devices per process, the jitted copy to every device)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(self.count, -1), ("processes", "local"))
    return mesh, jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))


class Inference:
  """The predictions of a state laid out by `state_shardings` on `mesh`.

  `model_of` picks the `two_tower.Model` out of the merged state (the trainer's state is a
  `TrainState`; an evaluator's is the model itself).
  """

  def __init__(self, graphdef, state_shardings, mesh: jax.sharding.Mesh, rules, *,
               model_of: Callable = lambda merged: merged,
               compiler_options: dict | None = None):
    self.mesh, self.rules = mesh, tuple(rules)
    self._graphdef, self._state_shardings = graphdef, state_shardings
    self._model_of = model_of
    self._options = compiler_options
    self._jits, self._executables = {}, {}
    self.processes = Processes()

  # ----- the jitted functions ----------------------------------------------------------------
  def _jit(self, fn: Callable, in_ndims: tuple[int, ...], all_rows: bool, static: tuple):
    key = (fn, in_ndims, all_rows, static)
    if key not in self._jits:
      graphdef, model_of, kwargs = self._graphdef, self._model_of, dict(static)

      def run(state, *arrays):
        return fn(model_of(nnx.merge(graphdef, state)), *arrays, **kwargs)

      # One sharding for every output: replicated, or the batch dimension split (a spec
      # shorter than the rank leaves the other dimensions whole).
      out = (NamedSharding(self.mesh, P()) if all_rows
             else sharding.batch_sharding(self.mesh, self.rules, 1))
      self._jits[key] = jax.jit(
          run, in_shardings=(self._state_shardings,
                             *(sharding.batch_sharding(self.mesh, self.rules, nd)
                               for nd in in_ndims)),
          out_shardings=out, compiler_options=self._options)
    return self._jits[key]

  def jitted(self, fn: Callable, *in_ndims: int, all_rows: bool = False, **static):
    """The jax.jit of fn(state, *arrays) for inputs of these ranks (to lower or compile
    ahead)."""
    return self._jit(fn, in_ndims, all_rows, tuple(sorted(static.items())))

  def __call__(self, fn: Callable, state, *arrays: np.ndarray, all_rows: bool = False,
               **static):
    """fn(model, *arrays, **static) over a batch (host arrays, batch first).

    all_rows=False: `arrays` are this process's rows (the same number on every process) and so
    is the result. all_rows=True: every process hands in the whole batch and gets the whole
    result; each computes its `local_rows`.
    """
    if all_rows:
      rows = self.processes.local_rows(len(arrays[0]))
      arrays = tuple(np.asarray(a)[rows] for a in arrays)
    jitted = self.jitted(fn, *(np.ndim(a) for a in arrays), all_rows=all_rows, **static)
    key = (jitted, tuple((np.shape(a), np.asarray(a).dtype.str) for a in arrays))
    with jax.set_mesh(self.mesh), core_spmd.logical_axis_rules(self.rules):
      inputs = [jax.make_array_from_process_local_data(
          sharding.batch_sharding(self.mesh, self.rules, np.ndim(a)), np.asarray(a))
                for a in arrays]
      if key not in self._executables:
        self._executables[key] = jitted.lower(state, *inputs).compile()
        # A process that found this one in the persistent compilation cache waits for those
        # still compiling: CPU collectives (gloo) give up after 30 s.
        distributed.wait_for_all(f"klip_inference_{next(_COMPILED)}")
      out = self._executables[key](state, *inputs)
    return jax.tree.map(np.asarray if all_rows else _local_rows, out)

  def generator(self, state, tokens: np.ndarray, *, max_new: int, beam_size: int = 1,
                all_rows: bool = False) -> predict.Generate:
    """`predict.Generate` of `predict.continue_text` for image tokens [n, 1 + P, W], up to
    [SEP]."""
    return lambda prompt, prompt_len: self(
        predict.continue_text, state, tokens, prompt, prompt_len, all_rows=all_rows,
        max_new=max_new, stop=SEP, beam_size=beam_size)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order (the inverse of
  `jax.make_array_from_process_local_data`); replicas of a row block are read once."""
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])
