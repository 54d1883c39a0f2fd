"""What bench/scio.py measures of SCIO on planted errors: the planting, screening and
reconstruction counts, test retrieval, and how well the final model tells a true caption from
the same caption with one planted value (the ceiling screening works under)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from evals import retrieval as retrieval_lib
from evals.predictor import Predictor
from klip import checkpoint as checkpoint_lib
from klip import sharding
from klip.data import caption as caption_lib
from klip.data import content as content_lib
from klip.data import dataset as dataset_lib
from klip.data import schema
from klip.data import values as values_lib
from klip.scio import table as table_lib


@dataclasses.dataclass
class Counts:
  """Screening and reconstruction counts of one field (or all)."""
  planted: int = 0
  flagged: int = 0
  hits: int = 0
  rewrites: int = 0
  right: int = 0

  def add(self, other: Counts) -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def row(self, name: str) -> str:
    p = self.hits / self.flagged if self.flagged else float("nan")
    r = self.hits / self.planted if self.planted else float("nan")
    f1 = 2 * p * r / (p + r) if p + r > 0 else float("nan")
    acc = self.right / self.rewrites if self.rewrites else float("nan")
    return (f"{name:<14}{self.planted:>8}{self.flagged:>8}{p:>10.3f}{r:>8.3f}{f1:>8.3f}"
            f"{self.rewrites:>9}{acc:>10.3f}")


def captions(data_dir: str, dataset: str, split: str):
  """(structured captions, example ids) of a prepared dataset's split, in record order."""
  source = dataset_lib.source(data_dir, dataset, split)
  records = [source[i] for i in range(len(source))]
  return ([schema.structured_text(r) for r in records],
          tuple(schema.example_id(r) for r in records))


def plant(texts, ids, dataset: str, rate: float, seed: int):
  """(initial table with planted rewrites, {(row, clause): true value}); a planted value says
  something else than the true one (`ValuePool.alternatives`: a rewording is not an error)."""
  rng = np.random.default_rng(seed)
  pool = values_lib.ValuePool.from_texts(texts)
  table = table_lib.PairTable.initial(dataset, [table_lib.id_hash(i) for i in ids])
  planted = {}
  for i, st in enumerate(texts):
    for k, name in enumerate(st.field_names):
      others = pool.alternatives(st.family, name, st.values[k])
      if name in caption_lib.OBSERVABLE_FIELDS and others and rng.random() < rate:
        table.rewrites.setdefault(i, {})[k] = others[int(rng.integers(len(others)))]
        planted[(i, k)] = st.values[k]
  return table, planted


def screening(final: table_lib.PairTable, initial: table_lib.PairTable, texts, planted):
  """Counts per field name over the rows SCIO rescored; a rewrite is right when it
  says what the true value says (`content`)."""
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
                 right=int(rewritten and content_lib.content(name, now)
                           == content_lib.content(name, st.values[k])))
      counts.setdefault(name, Counts()).add(c)
  return counts


def _final_predictor(workdir: str) -> Predictor:
  """The run's final model on this process's devices, through the evaluators' harness."""
  step = checkpoint_lib.complete_steps(os.path.join(workdir, "checkpoints"))[-1]
  return Predictor.restore(workdir, step, mesh=sharding.make_mesh(dict(slice=1, data=-1,
                                                                         fsdp=1, tensor=1)),
                           batch_size=64)


def _records(data_dir: str, dataset: str, split: str) -> list:
  source = dataset_lib.source(data_dir, dataset, split)
  return [source[i] for i in range(len(source))]


def retrieval(config, workdir: str, data_dir: str) -> dict[str, float]:
  """Image->text and text->image recall@1/5 of a run's final model on the test split, ranked
  as the retrieval evaluator ranks (`evals.retrieval.ranks`: ties count against the query)."""
  pred = _final_predictor(workdir)
  records = _records(data_dir, config.data.dataset, "test")
  tokens = np.stack([pred.tokenizer.encode_caption(schema.structured_text(r), pred.max_len)[0]
                     for r in records])
  sim = pred.encode_images(pred.images(records)).embedding @ pred.embed_texts(tokens).T
  out = {}
  for name, s in (("i2t", sim), ("t2i", sim.T)):
    query_ranks = retrieval_lib.ranks(s)
    for k in (1, 5):
      out[f"{name}_R@{k}"] = float(np.mean(retrieval_lib.recall_at_k(query_ranks, k)))
  return out


def discrimination(config, workdir: str, data_dir: str, texts, initial: table_lib.PairTable,
                   planted, limit: int, seed: int, split: str = "") -> dict[str, np.ndarray]:
  """How often the run's final model scores a caption of `split` (default the training split)
  above the same caption with one planted value, on the caption's own image: {field: bool
  [n, 4]} (cosine higher, match probability higher; then the same for the planted clause alone
  against the true one, "prefix value" in `loss.clause_max_len` tokens, as the clause screen
  scores it) over up to `limit` planted clauses drawn at random; `texts`, `initial` and
  `planted` are that split's (`plant`).

  SCIO's screening compares these same scores (`predict.score`) with and without a clause, so
  on the training split this pairwise accuracy (0.5: chance) bounds what any screening rule on
  them can find; on the test split, whose captions the model never trained on, it says what
  the model sees in the pixels."""
  pred = _final_predictor(workdir)
  records = _records(data_dir, config.data.dataset, split or config.data.split)
  keys = sorted(planted)
  rng = np.random.default_rng(seed)
  keys = [keys[j] for j in sorted(rng.permutation(len(keys))[:limit])]
  out = {}
  for lo in range(0, len(keys), 32):
    chunk = keys[lo:lo + 32]
    images = pred.images([records[i] for i, _ in chunk])
    true = [pred.tokenizer.encode_caption(texts[i], pred.max_len)[0] for i, _ in chunk]
    wrong = [pred.tokenizer.encode_caption(
        table_lib.rewritten(texts[i], {k: initial.rewrites[i][k]}), pred.max_len)[0]
             for i, k in chunk]
    cosine, match = (x.reshape(2, -1) for x in pred.pair_scores(
        np.concatenate([images, images]), np.stack(true + wrong)))
    clause = lambda i, k, v: pred.tokenizer.encode_text(  # noqa: E731
        caption_lib.PREFIXES[texts[i].field_names[k]] + v, config.loss.clause_max_len)
    c_cos, c_match = (x.reshape(2, -1) for x in pred.pair_scores(
        np.concatenate([images, images]),
        np.stack([clause(i, k, texts[i].values[k]) for i, k in chunk]
                 + [clause(i, k, initial.rewrites[i][k]) for i, k in chunk])))
    higher = np.stack([cosine[0] > cosine[1], match[0] > match[1], c_cos[0] > c_cos[1],
                       c_match[0] > c_match[1]], axis=1)
    for (i, k), row in zip(chunk, higher):
      out.setdefault(texts[i].field_names[k], []).append(row)
  return {name: np.stack(rows) for name, rows in out.items()}
