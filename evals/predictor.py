"""A restored KLIP model and its named predictions, batched, for the evaluators.

Every prediction goes through `klip.inference` (the harness the SCIO pass uses, over the same
`klip.predict` functions), jitted once per shape; inputs and outputs are host numpy arrays.
With several processes each computes its share of every batch and all get every output, so
the evaluators run the same on each (process 0 writes). The model config, data
normalisation and tokenizer come from the training workdir (`config.json`,
`tokenizer.model`), so an eval config names only tasks and data. The model is laid out on the
eval job's own mesh (any device count): parameters by the run's logical rules, batches over
the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from klip import checkpoint as checkpoint_lib
from klip import inference as inference_lib
from klip import paths
from klip import predict
from klip import provenance
from klip import sharding
from klip.data import caption as caption_lib
from klip.data import pipeline
from klip.data import schema
from klip.data import tokenizer as tokenizer_lib
from klip.model import two_tower
from klip.model import vit


class ImageFeatures(NamedTuple):
  """Frozen image features of N images (host float32)."""
  embedding: np.ndarray  # [N, E] unit vectors in the shared image-text space
  pooled: np.ndarray     # [N, W] the image vector before projection (`ViT.pool`: the mean of
                         # the patch tokens or the CLS token; linear probe / k-NN)
  patches: np.ndarray    # [N, gh, gw, W] patch tokens on the patch grid (dense heads)
  cls: np.ndarray | None = None  # [N, W] the CLS token (the first of the ViT's tokens)


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

  def __post_init__(self):
    predict.check_vocab(self.model, self.tokenizer)
    graphdef, self._state = nnx.split(self.model)
    self.inference = inference_lib.Inference(
        graphdef, jax.tree.map(lambda x: x.sharding, self._state), self.mesh, self.rules)

  @classmethod
  def restore(cls, workdir: str, step: int, *, mesh: jax.sharding.Mesh,
              batch_size: int = 64) -> Predictor:
    config = provenance.read_config(workdir)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: two_tower.Model(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    target = checkpoint_lib.abstract_pure(abstract_state, shardings)
    restored = checkpoint_lib.restore_model(
        str(epath.Path(paths.resolve(workdir)) / "checkpoints"), step, target)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    tok = tokenizer_lib.Tokenizer(str(epath.Path(workdir) / "tokenizer.model"))
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
    """fn(model, *batch) over the leading axis in batches (the last one padded to a full batch
    so each shape compiles once); returns host arrays without the padding."""
    n = arrays[0].shape[0]
    outs = []
    for start in range(0, n, self.batch_size):
      chunk, m = self._chunk(arrays, start)
      out = self.inference(fn, self._state, *chunk, all_rows=True)
      outs.append(jax.tree.map(lambda x, m=m: x[:m], out))
    if not outs:
      raise ValueError("no inputs to predict on")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def _chunk(self, arrays, start: int):
    """(the batch of `arrays` from `start`, padded by repeating its last row; real rows)."""
    chunk = [a[start:start + self.batch_size] for a in arrays]
    m = chunk[0].shape[0]
    pad = lambda c: np.concatenate([c, np.repeat(c[-1:], self.batch_size - m, axis=0)])
    return [pad(c) if m < self.batch_size else c for c in chunk], m

  def encode_images(self, images: np.ndarray) -> ImageFeatures:
    """Embedding, pooled, patch and CLS features of model inputs [N, S, S, C]."""
    emb, pooled, patches, cls = self._batched(inference_lib.features, images)
    g = self.patch_grid
    return ImageFeatures(emb, pooled, patches.reshape(patches.shape[0], g, g, -1), cls)

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
    return np.concatenate([f.cls[:, None], patches], axis=1)

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    """ViT tokens [N, 1 + P, W] (the image side of matching and generation)."""
    return self._batched(inference_lib.image_tokens, images)

  def embed_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """Unit text embeddings [N, E] of free texts or of tokens [N, L]."""
    tokens = texts if isinstance(texts, np.ndarray) else self.tokens(texts)
    return self._batched(predict.embed_texts, tokens)

  def match_prob(self, image_tokens: np.ndarray, texts: Sequence[str] | np.ndarray
                 ) -> np.ndarray:
    """ITM probability [P] that text p describes the image of image_tokens[p]."""
    tokens = texts if isinstance(texts, np.ndarray) else self.tokens(texts)
    return self._batched(predict.match_prob, image_tokens, tokens)

  def text_logprob(self, image_tokens: np.ndarray, texts: Sequence[str] | np.ndarray
                   ) -> np.ndarray:
    """Decoder log-likelihood [P] of text p given the image of image_tokens[p] (free texts, or
    text-tower tokens [P, L] whose [ENC] is replaced by [DEC])."""
    tokens = np.array(texts if isinstance(texts, np.ndarray) else self.tokens(texts))
    tokens[:, 0] = caption_lib.DEC
    return self._batched(predict.text_logprob, image_tokens, tokens)

  def pair_scores(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, match probability) [N] of image n with text-tower tokens [N, L] row n, scored
    as the SCIO pass scores (`predict.score`)."""
    return self._batched(inference_lib.pair_scores, images, tokens)

  def logit_scale(self) -> float:
    """The learned contrastive temperature scale (multiplies cosine similarities)."""
    return float(self.model.temperature_scale())

  def caption(self, image_tokens: np.ndarray, family: str, *, max_span: int = 12,
              beam_size: int = 1) -> list[str]:
    """One generated `family` caption per image (template prefixes forced, values decoded)."""
    out = []
    for start in range(0, image_tokens.shape[0], self.batch_size):
      (chunk,), m = self._chunk((image_tokens,), start)
      generate = self.inference.generator(self._state, chunk, max_new=max_span,
                                          beam_size=beam_size, all_rows=True)
      out.extend(predict.caption(generate, self.tokenizer, len(chunk), self.max_len,
                                 family)[:m])
    return out
