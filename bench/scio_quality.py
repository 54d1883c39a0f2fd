"""What bench/scio.py measures of SCIO on planted errors: the planting, screening and
reconstruction counts, test retrieval, and how well the final model tells a true caption from
the same caption with one planted value (the ceiling screening works under)."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from klip import checkpoint as checkpoint_lib
from klip import predict
from klip.data import chip as chip_lib
from klip.data import dataset as dataset_lib
from klip.data import pipeline
from klip.data import schema
from klip.data import tokenizer as tokenizer_lib
from klip.model import two_tower
from klip.scio import table as table_lib


@dataclasses.dataclass
class Counts:
  """Screening and reconstruction counts of one field (or all)."""
  planted: int = 0
  flagged: int = 0
  hits: int = 0
  rewrites: int = 0
  exact: int = 0

  def add(self, other: Counts) -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def row(self, name: str) -> str:
    p = self.hits / self.flagged if self.flagged else float("nan")
    r = self.hits / self.planted if self.planted else float("nan")
    f1 = 2 * p * r / (p + r) if p + r > 0 else float("nan")
    acc = self.exact / self.rewrites if self.rewrites else float("nan")
    return (f"{name:<14}{self.planted:>8}{self.flagged:>8}{p:>10.3f}{r:>8.3f}{f1:>8.3f}"
            f"{self.rewrites:>9}{acc:>10.3f}")


def captions(data_dir: str, dataset: str, split: str):
  """(structured captions, example ids) of a prepared dataset's split, in record order."""
  source = dataset_lib.source(data_dir, dataset, split)
  records = [source[i] for i in range(len(source))]
  return ([schema.structured_text(r) for r in records],
          tuple(table_lib.example_id(r) for r in records))


def plant(texts, ids, dataset: str, rate: float, seed: int):
  """(initial table with planted rewrites, {(row, clause): true value})."""
  rng = np.random.default_rng(seed)
  pool = {}
  for st in texts:
    for k, name in enumerate(st.field_names):
      pool.setdefault((st.family, name), set()).add(st.values[k])
  pool = {key: sorted(v) for key, v in pool.items()}
  table = table_lib.PairTable.initial(dataset, ids)
  planted = {}
  for i, st in enumerate(texts):
    for k, name in enumerate(st.field_names):
      others = [v for v in pool[(st.family, name)] if v != st.values[k]]
      if name in chip_lib.OBSERVABLE_FIELDS and others and rng.random() < rate:
        table.rewrites.setdefault(i, {})[k] = others[int(rng.integers(len(others)))]
        planted[(i, k)] = st.values[k]
  return table, planted


def screening(final: table_lib.PairTable, initial: table_lib.PairTable, texts, planted):
  """Counts per field name over the rows SCIO rescored."""
  counts = {}
  for i in np.flatnonzero(final.scored_version >= 0):
    st = texts[i]
    for k, name in enumerate(st.field_names):
      start = initial.rewrites.get(i, {}).get(k, st.values[k])
      now = final.rewrites.get(i, {}).get(k, st.values[k])
      rewritten = now != start
      flagged = rewritten or final.dropped[i] == k
      c = Counts(planted=int((i, k) in planted), flagged=int(flagged),
                 hits=int(flagged and (i, k) in planted), rewrites=int(rewritten),
                 exact=int(rewritten and now == st.values[k]))
      counts.setdefault(name, Counts()).add(c)
  return counts


def _final_model(config, workdir: str):
  """The run's final model and its evaluation-time preprocessing."""
  with nnx.use_eager_sharding(False):
    model = two_tower.Model(config.model, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, checkpoint_lib.read_params(workdir))
  nnx.update(model, state)
  m = config.model
  prep = pipeline.Preprocess(tokenizer_path=os.path.join(workdir, "tokenizer.model"),
                             image_size=m.image_size, channels=m.channels,
                             max_len=m.text.max_len, db_min=config.data.db_min,
                             db_max=config.data.db_max, train=False)
  return model, prep


def retrieval(config, workdir: str, data_dir: str) -> dict[str, float]:
  """Image->text and text->image recall@1/5 of a run's final model on the test split."""
  model, prep = _final_model(config, workdir)
  source = dataset_lib.source(data_dir, config.data.dataset, "test")
  embed = nnx.jit(lambda mdl, im, tok: (predict.embed_images(mdl, im)[0],
                                        predict.embed_texts(mdl, tok)))
  zi, zt = [], []
  examples = [prep.random_map((i, source[i]), None) for i in range(len(source))]
  for lo in range(0, len(examples), 64):
    chunk = examples[lo:lo + 64]
    a, b = embed(model, jnp.asarray(np.stack([e["image"] for e in chunk])),
                 jnp.asarray(np.stack([e["tokens"] for e in chunk])))
    zi.append(np.asarray(a))
    zt.append(np.asarray(b))
  sim = np.concatenate(zi) @ np.concatenate(zt).T
  out = {}
  for name, s in (("i2t", sim), ("t2i", sim.T)):
    rank = np.sum(s > np.diag(s)[:, None], axis=1)
    for k in (1, 5):
      out[f"{name}_R@{k}"] = float(np.mean(rank < k))
  return out


def discrimination(config, workdir: str, data_dir: str, texts, initial: table_lib.PairTable,
                   planted, limit: int, seed: int, split: str = "") -> dict[str, np.ndarray]:
  """How often the run's final model scores a caption of `split` (default the training split)
  above the same caption with one planted value, on the caption's own image: {field: bool
  [n, 2]} (cosine higher, match probability higher) over up to `limit` planted clauses drawn
  at random; `texts`, `initial` and `planted` are that split's (`plant`).

  SCIO's screening compares these same scores (`predict.score`) with and without a clause, so
  on the training split this pairwise accuracy (0.5: chance) bounds what any screening rule on
  them can find; on the test split, whose captions the model never trained on, it says what
  the model sees in the pixels."""
  model, prep = _final_model(config, workdir)
  source = dataset_lib.source(data_dir, config.data.dataset, split or config.data.split)
  tokenizer = tokenizer_lib.Tokenizer(os.path.join(workdir, "tokenizer.model"))
  keys = sorted(planted)
  rng = np.random.default_rng(seed)
  keys = [keys[j] for j in sorted(rng.permutation(len(keys))[:limit])]
  def pair_scores(mdl, images, texts):  # texts: the true captions, then the planted ones
    both = lambda x: jnp.concatenate([x, x])
    zimg, image_tokens = predict.embed_images(mdl, images)
    return tuple(predict.score(mdl, both(zimg), both(image_tokens), texts))

  scores = nnx.jit(pair_scores)
  out = {}
  for lo in range(0, len(keys), 32):
    chunk = keys[lo:lo + 32]
    images = np.stack([prep.random_map((i, source[i]), None)["image"] for i, _ in chunk])
    true = [tokenizer.encode_caption(texts[i], prep.max_len)[0] for i, _ in chunk]
    wrong = [tokenizer.encode_caption(
        table_lib.rewritten(texts[i], {k: initial.rewrites[i][k]}), prep.max_len)[0]
             for i, k in chunk]
    cosine, match = (np.asarray(x).reshape(2, -1) for x in scores(
        model, jnp.asarray(images), jnp.asarray(np.stack(true + wrong))))
    higher = np.stack([cosine[0] > cosine[1], match[0] > match[1]], axis=1)
    for (i, k), row in zip(chunk, higher):
      out.setdefault(texts[i].field_names[k], []).append(row)
  return {name: np.stack(rows) for name, rows in out.items()}
