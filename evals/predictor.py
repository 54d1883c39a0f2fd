"""A restored KLIP model and its named predictions, batched, for the evaluators.

Every prediction goes through `klip.predict` (the same functions the SCIO pass calls), jitted
once per shape; inputs and outputs are host numpy arrays. The model config, data
normalisation and tokenizer come from the training workdir (`config.json`,
`tokenizer.model`), so an eval config names only tasks and data. The model is laid out on the
eval job's own mesh (any device count): parameters by the run's logical rules, batches over
the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from klip import checkpoint as checkpoint_lib
from klip import predict
from klip import sharding
from klip.data import pipeline
from klip.data import schema
from klip.data import tokenizer as tokenizer_lib
from klip.model import two_tower
from klip.model import vit


class ImageFeatures(NamedTuple):
  """Frozen image features of N images (host float32)."""
  embedding: np.ndarray  # [N, E] unit vectors in the shared image-text space
  pooled: np.ndarray     # [N, W] the CLS token before projection (linear probe / k-NN)
  patches: np.ndarray    # [N, gh, gw, W] patch tokens on the patch grid (dense heads)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config recorded in WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a KLIP training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


@dataclasses.dataclass
class Predictor:
  """The predictions of one checkpoint. Build it with `Predictor.restore`."""
  model: two_tower.Model
  tokenizer: tokenizer_lib.Tokenizer
  config: ml_collections.ConfigDict  # the training run's config
  mesh: jax.sharding.Mesh
  rules: tuple
  step: int
  batch_size: int = 64
  _features: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def restore(cls, workdir: str, step: int, *, mesh: jax.sharding.Mesh,
              batch_size: int = 64) -> Predictor:
    config = run_config(workdir)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: two_tower.Model(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    target = checkpoint_lib.abstract_pure(abstract_state, shardings)
    restored = checkpoint_lib.restore_model(os.path.join(os.path.abspath(workdir),
                                                         "checkpoints"), step, target)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    tok = tokenizer_lib.Tokenizer(os.path.join(workdir, "tokenizer.model"))
    return cls(model=nnx.merge(graphdef, state), tokenizer=tok, config=config, mesh=mesh,
               rules=rules, step=step, batch_size=batch_size)

  # ----- shapes and input -----------------------------------------------------------------
  @property
  def image_size(self) -> int:
    return self.config.model.image_size

  @property
  def patch_grid(self) -> int:
    return vit.patch_grid(self.config.model)

  @property
  def max_len(self) -> int:
    return self.config.model.text.max_len

  @functools.cached_property
  def _preprocess(self) -> pipeline.Preprocess:
    d, m = self.config.data, self.config.model
    return pipeline.Preprocess(tokenizer_path=self.tokenizer.path, image_size=m.image_size,
                               channels=m.channels, max_len=m.text.max_len, db_min=d.db_min,
                               db_max=d.db_max, train=False)

  def image(self, db: np.ndarray) -> np.ndarray:
    """Model input [S, S, C] of a dB image [H, W, C] (centre crop or resample to S)."""
    return self._preprocess.image(db)

  def images(self, records: Sequence[dict]) -> np.ndarray:
    """Model inputs [N, S, S, C] of decoded dataset records."""
    return np.stack([self.image(schema.decode_image(r)) for r in records])

  def tokens(self, texts: Sequence[str]) -> np.ndarray:
    """Text-tower tokens [N, max_len] of free texts (prompts, captions)."""
    return np.stack([self.tokenizer.encode_text(t, self.max_len) for t in texts])

  # ----- batched, jitted predictions ----------------------------------------------------------
  def _batched(self, fn: Callable, *arrays: np.ndarray):
    """Applies jitted fn(model, *batch) over the leading axis in batches (the last one padded
    to a full batch so each shape compiles once); returns host arrays without the padding."""
    n = arrays[0].shape[0]
    b = self.batch_size
    outs = []
    with jax.set_mesh(self.mesh):
      for start in range(0, n, b):
        chunk = [a[start:start + b] for a in arrays]
        m = chunk[0].shape[0]
        chunk = [np.concatenate([c, np.repeat(c[-1:], b - m, axis=0)]) if m < b else c
                 for c in chunk]
        out = fn(self.model, *(self._put(c) for c in chunk))
        outs.append(jax.tree.map(lambda x, m=m: np.asarray(x)[:m], out))
    if not outs:
      raise ValueError("no inputs to predict on")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim))

  def encode_images(self, images: np.ndarray) -> ImageFeatures:
    """Embedding, pooled CLS and patch features of model inputs [N, S, S, C]."""
    emb, pooled, patches = self._batched(_encode_images, images)
    g = self.patch_grid
    return ImageFeatures(emb, pooled, patches.reshape(patches.shape[0], g, g, -1))

  def split_features(self, split) -> ImageFeatures:
    """`encode_images` of an `evals.data.Split`'s records, computed once per split and kept
    for the other evaluators of this checkpoint."""
    key = (split.dataset, split.name, split.split, tuple(split.ids))
    if key not in self._features:
      self._features[key] = self.encode_images(self.images(split.records))
    return self._features[key]

  def split_image_tokens(self, split) -> np.ndarray:
    """ViT tokens [N, 1 + P, W] of a split's records, rebuilt from `split_features` (the CLS
    token and the patch tokens) so the image tower runs once per split."""
    f = self.split_features(split)
    patches = f.patches.reshape(f.patches.shape[0], -1, f.patches.shape[-1])
    return np.concatenate([f.pooled[:, None], patches], axis=1)

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    """ViT tokens [N, 1 + P, W] (the image side of matching and generation)."""
    return self._batched(_image_tokens, images)

  def embed_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """Unit text embeddings [N, E] of free texts or of tokens [N, L]."""
    tokens = texts if isinstance(texts, np.ndarray) else self.tokens(texts)
    return self._batched(_embed_texts, tokens)

  def match_prob(self, image_tokens: np.ndarray, texts: Sequence[str] | np.ndarray
                 ) -> np.ndarray:
    """ITM probability [P] that text p describes the image of image_tokens[p]."""
    tokens = texts if isinstance(texts, np.ndarray) else self.tokens(texts)
    return self._batched(_match_prob, image_tokens, tokens)

  def text_logprob(self, image_tokens: np.ndarray, texts: Sequence[str] | np.ndarray
                   ) -> np.ndarray:
    """Decoder log-likelihood [P] of text p given the image of image_tokens[p] (free texts, or
    text-tower tokens [P, L] whose [ENC] is replaced by [DEC])."""
    tokens = np.array(texts if isinstance(texts, np.ndarray) else self.tokens(texts))
    tokens[:, 0] = tokenizer_lib.DEC
    return self._batched(_text_logprob, image_tokens, tokens)

  def logit_scale(self) -> float:
    """The learned contrastive temperature scale (multiplies cosine similarities)."""
    return float(self.model.temperature_scale())

  def caption(self, image_tokens: np.ndarray, family: str, *, max_span: int = 12,
              beam_size: int = 1) -> list[str]:
    """One generated `family` caption per image (template prefixes forced, values decoded)."""
    out = []
    with jax.set_mesh(self.mesh):
      for start in range(0, image_tokens.shape[0], self.batch_size):
        chunk = jnp.asarray(image_tokens[start:start + self.batch_size])
        out.extend(predict.caption(self.model, self.tokenizer, chunk, family,
                                   max_span=max_span, beam_size=beam_size))
    return out


@nnx.jit
def _encode_images(model, images):
  zimg, tokens = predict.embed_images(model, images)
  return zimg, tokens[:, 0].astype(jnp.float32), tokens[:, 1:].astype(jnp.float32)


@nnx.jit
def _image_tokens(model, images):
  return predict.embed_images(model, images)[1]


@nnx.jit
def _embed_texts(model, tokens):
  return predict.embed_texts(model, tokens)


@nnx.jit
def _text_logprob(model, image_tokens, tokens):
  return predict.text_logprob(model, image_tokens, tokens)


@nnx.jit
def _match_prob(model, image_tokens, tokens):
  return predict.match_prob(model, image_tokens, tokens)
