"""Linear heads on frozen patch features: the tiled features of a split and one training recipe.

`tiled_features` cuts every record of a split into model-input tiles (`evals.tiling`) and
encodes them with the frozen backbone; a split of S x S chips is one tile per record and reuses
`Predictor.split_features` (computed once per checkpoint for all evaluators). Outside a scene
smaller than S, tiles are filled with the run's `db_min` (the darkest input).

A head is linear on each patch token (a 1x1 convolution, `linear`): a probe of what the frozen
features hold. It sees them standardised by the training tiles' per-channel mean and standard
deviation (`Standardise`). (Heads with a hidden 3x3 convolution fitted the 338 training chips
of `tiny` better and scored lower on its test split.)

`fit` is the recipe every head is trained with: AdamW (LEARNING_RATE, cosine decay to 0,
weight decay WEIGHT_DECAY), mini-batches of BATCH_SIZE training tiles drawn without replacement
each epoch (the epoch's remainder is skipped; all tiles when there are fewer), batches shuffled
from `seed` and parameters initialised from it: the same inputs and seed give the same weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evals import tiling
from klip.data import schema

BATCH_SIZE = 64
LEARNING_RATE = 3e-2
WEIGHT_DECAY = 1e-4


@dataclasses.dataclass
class Tiles:
  """A split's records cut into model-input tiles, with the tiles' frozen patch features.
  Tiles are in record order, row-major within a record."""
  images: list[np.ndarray]       # [H, W, C] dB of each record
  tilings: list[tiling.Tiling]   # of each record
  patches: np.ndarray            # [T, g, g, W]

  def rows(self, record: int) -> slice:
    """The tiles of one record."""
    return slice(self._starts[record], self._starts[record + 1])

  @functools.cached_property
  def _starts(self) -> np.ndarray:
    return np.cumsum([0] + [len(t) for t in self.tilings])

  @property
  def record(self) -> np.ndarray:
    """[T] the record of each tile."""
    return np.repeat(np.arange(len(self.tilings)), [len(t) for t in self.tilings])

  @property
  def origins(self) -> np.ndarray:
    """[T, 2] (y, x) of each tile in its record."""
    return np.concatenate([t.origins for t in self.tilings])


def tiled_features(predictor, split) -> Tiles:
  """The tiles of every record of `split` and their patch features."""
  s = predictor.image_size
  images = [schema.decode_image(r) for r in split.records]
  tilings = [tiling.Tiling.of(im.shape, s) for im in images]
  if all(im.shape[:2] == (s, s) for im in images):
    return Tiles(images, tilings, predictor.split_features(split).patches)
  fill = predictor.config.data.db_min
  inputs = np.stack([predictor.image(tile) for im, t in zip(images, tilings)
                     for tile in t.tiles(im, fill)])
  return Tiles(images, tilings, predictor.encode_images(inputs).patches)


@dataclasses.dataclass(frozen=True)
class Standardise:
  """Per-channel standardisation with the statistics of the training features."""
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray) -> Standardise:
    axes = tuple(range(x.ndim - 1))
    return cls(x.mean(axes), x.std(axes) + 1e-6)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return ((x - self.mean) / self.std).astype(np.float32)


def linear_params(seed: int, features_in: int, features_out: int,
                  bias: np.ndarray | float = 0.0) -> dict:
  """A LeCun-normal kernel [in, out] drawn from `seed`, and a bias [out]."""
  kernel = jax.nn.initializers.lecun_normal()(jax.random.key(seed), (features_in, features_out))
  return {"kernel": kernel,
          "bias": jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (features_out,))}


def linear(params: dict, x: jax.Array) -> jax.Array:
  """The linear head on every patch: [..., in] -> [..., out]."""
  return x @ params["kernel"] + params["bias"]


def fit(loss_fn: Callable, params, data: tuple[np.ndarray, ...], *, epochs: int, seed: int):
  """Trains params to minimise loss_fn(params, *batch) over the rows of `data` (arrays with the
  same leading axis); returns (params, mean loss of the last epoch)."""
  n = data[0].shape[0]
  if not n or epochs < 1:
    raise ValueError(f"cannot train a head on {n} tiles for {epochs} epochs")
  batch = min(BATCH_SIZE, n)
  steps_per_epoch = n // batch
  optimizer = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, epochs * steps_per_epoch),
                          weight_decay=WEIGHT_DECAY)

  @jax.jit
  def step(params, opt_state, data, rows):
    loss, grads = jax.value_and_grad(loss_fn)(params, *(a[rows] for a in data))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  device_data = tuple(jnp.asarray(a) for a in data)
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(n)
    losses = []
    for i in range(steps_per_epoch):
      params, opt_state, loss = step(params, opt_state, device_data,
                                     order[i * batch:(i + 1) * batch])
      losses.append(loss)
  return params, float(np.mean(jax.device_get(losses)))


def predict(apply_fn: Callable, params, x: np.ndarray) -> np.ndarray:
  """apply_fn(params, batch) over the rows of x in batches of BATCH_SIZE (the last padded, so
  one shape compiles), as a host array."""
  fn = jax.jit(apply_fn)
  outs = []
  for start in range(0, x.shape[0], BATCH_SIZE):
    chunk = x[start:start + BATCH_SIZE]
    m = chunk.shape[0]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], BATCH_SIZE - m, axis=0)])
    outs.append(np.asarray(fn(params, padded))[:m])
  return np.concatenate(outs)
