"""The SCIO rescoring pass: score leave-one-clause-out captions, screen, proofread, reconstruct.

For each pair the full caption (rewrites applied, nothing dropped) and its K leave-one-clause-
out variants are scored with `predict.score` (cosine and ITM match probability) by one jitted
function sharded like the train step: the image side is computed once per image and reused for
its K + 1 texts. The decisions are made on the host:

  screen       the clause whose removal raises BOTH scores by more than their margins
               (`scio.margin_cosine`, `scio.margin_match`); among several, the one with the
               largest summed rise; else none.
  proofread    the flagged clause is dropped from the training caption, and the pair weight is
               floor + (1 - floor) * match probability of the kept caption (`scio.weight_floor`):
               pairs the model still finds inconsistent count less, never below the floor.
  reconstruct  (last stage) the flagged value span is refilled greedily by `predict.fill_span`;
               with `scio.fill_candidates` = N > 0 the field's N most frequent other values
               (`values.ValuePool`) compete with that fill, and the decoder's log-likelihood of
               each whole caption (`predict.text_logprob`) picks one. The rewrite is kept only
               if the rewritten caption beats the original on both scores, and then the clause
               is no longer dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klip import predict
from klip import sharding
from klip.data import chip as chip_lib
from klip.data import schema
from klip.data import text as text_lib
from klip.data.tokenizer import DEC
from klip.scio import table as table_lib
from klip.scio import values as values_lib

CLAUSES = len(chip_lib.TARGET_FIELDS)  # K: clauses per caption, the same in every family
assert all(len(f) == CLAUSES for f in chip_lib.FAMILIES.values())

ScoreFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
FillFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                  tuple[np.ndarray, np.ndarray]]
RankFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Stage(enum.IntEnum):
  WARMUP = 0       # full captions, no pass
  PROOFREAD = 1    # screen + proofread
  RECONSTRUCT = 2  # screen + proofread + reconstruct


# ---------------------------------------------------------------------------------------------
# Decisions (host, numpy).
# ---------------------------------------------------------------------------------------------
def screen(cosine: np.ndarray, match: np.ndarray, margin_cosine: float,
           margin_match: float) -> np.ndarray:
  """Flagged clause per pair (-1: none) from scores [n, K + 1] (column 0: full caption,
  column k + 1: caption without clause k)."""
  d_cos = cosine[:, 1:] - cosine[:, :1]
  d_match = match[:, 1:] - match[:, :1]
  ok = (d_cos > margin_cosine) & (d_match > margin_match)
  rise = np.where(ok, d_cos + d_match, -np.inf)
  return np.where(ok.any(axis=1), np.argmax(rise, axis=1), -1).astype(np.int32)


def pair_weight(match_kept: np.ndarray, floor: float) -> np.ndarray:
  return (floor + (1.0 - floor) * match_kept).astype(np.float32)


def pass_rows(version: int, n: int, slice_size: int) -> np.ndarray:
  """The table rows of pass number `version`: all of them, or the next rotating slice."""
  if slice_size <= 0 or slice_size >= n:
    return np.arange(n)
  return (version * slice_size + np.arange(slice_size)) % n


# ---------------------------------------------------------------------------------------------
# The jitted, sharded scores of a train state.
# ---------------------------------------------------------------------------------------------
# On CPU they compile without XLA:CPU's YNNPACK fusions, which put a whole MLP sublayer
# (LayerNorm, both matmuls, GELU, residual) into one library graph: on tiny's scoring chunk
# (64 pairs x 9 texts x 128 tokens) its matmuls ran at 63-100 GFLOP/s against 150 for XLA's own
# dots, 1.64 s a chunk against 1.34 s without (2 cores). Train steps keep them (B1's step 2.38 s
# with, 2.66 s without; tiny's 0.89 s against 0.99 s). bench/README.md has the measurements.
CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class ModelScorer:
  """`predict.score` of the K + 1 texts of each image, jitted with explicit shardings.

  State, images and texts are placed like the train step's (batch over the batch axes of the
  mesh); call under the trainer's `jax.set_mesh` and logical-axis-rules context.
  """

  def __init__(self, graphdef, state_shardings, mesh, rules, tokenizer, *, max_span: int):
    self._graphdef = graphdef
    self._tokenizer = tokenizer
    self._max_span = max_span
    batch = lambda nd: sharding.batch_sharding(mesh, rules, nd)
    options = CPU_INFERENCE_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None

    def scores(state, images, texts):
      model = nnx.merge(graphdef, state).model
      zimg, image_tokens = predict.embed_images(model, images)
      n, v, length = texts.shape
      s = predict.score(model, jnp.repeat(zimg, v, axis=0), jnp.repeat(image_tokens, v, axis=0),
                        texts.reshape(n * v, length))
      return s.cosine.reshape(n, v), s.match.reshape(n, v)

    def image_tokens(state, images):
      return predict.embed_images(nnx.merge(graphdef, state).model, images)[1]

    def logprobs(state, images, texts):
      model = nnx.merge(graphdef, state).model
      image_tokens = predict.embed_images(model, images)[1]
      n, v, length = texts.shape
      return predict.text_logprob(model, jnp.repeat(image_tokens, v, axis=0),
                                  texts.reshape(n * v, length)).reshape(n, v)

    self._scores = jax.jit(scores, in_shardings=(state_shardings, batch(4), batch(3)),
                           out_shardings=(batch(2), batch(2)), compiler_options=options)
    self._image_tokens = jax.jit(image_tokens, in_shardings=(state_shardings, batch(4)),
                                 out_shardings=batch(3), compiler_options=options)
    self._logprobs = jax.jit(logprobs, in_shardings=(state_shardings, batch(4), batch(3)),
                             out_shardings=batch(2), compiler_options=options)

  def score(self, state, images: np.ndarray, texts: np.ndarray):
    """(cosine, match) [n, V] of images [n, H, W, C] against their texts [n, V, L]."""
    cosine, match = self._scores(state, images, texts)
    return np.asarray(cosine), np.asarray(match)

  def rank(self, state, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Decoder log-likelihood [n, V] of each of the V [DEC]-first texts [n, V, L] of image n."""
    return np.asarray(self._logprobs(state, images, texts))

  def fill(self, state, images, ids, clause, k):
    """`predict.fill_span` (greedy) of clause k[b] of each row (-1: unchanged)."""
    model = nnx.merge(self._graphdef, state).model
    return predict.fill_span(model, self._tokenizer, self._image_tokens(state, images), ids,
                             clause, k, max_span=self._max_span, beam_size=1)


# ---------------------------------------------------------------------------------------------
# The pass.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PassResult:
  """What one pass did: rows rescored, clause flagged per row (-1), rewrites kept, time."""
  stage: Stage
  rows: np.ndarray           # int [n] table rows rescored
  flagged: np.ndarray        # int32 [n]
  rewritten: np.ndarray      # bool [n]
  score_change: np.ndarray   # float32 [n, 2] (cosine, match) of the kept minus the full caption
  seconds: float

  def metrics(self) -> dict[str, float]:
    n = max(len(self.rows), 1)
    change = self.score_change.mean(axis=0) if len(self.rows) else np.zeros(2)
    return {"scio/rescored": float(len(self.rows)), "scio/stage": float(self.stage),
            "scio/flag_rate": float(np.sum(self.flagged >= 0) / n),
            "scio/rewrite_rate": float(np.sum(self.rewritten) / n),
            "scio/mean_cosine_change": float(change[0]),
            "scio/mean_match_change": float(change[1]),
            "scio/mean_score_change": float(change.mean()),
            "scio/pass_seconds": self.seconds,
            "scio/seconds_per_pair": self.seconds / n}


def caption_texts(tokenizer, st: text_lib.StructuredText, max_len: int):
  """(full ids [L], full clause [L], texts [K + 1, L]): the caption and its K leave-one-
  clause-out variants. Raises ValueError for a caption that does not have the schema's clauses
  or has an empty value span. A clause whose value is cut off entirely by max_len cannot be
  judged: its variant is the full caption (no rise, so it is never flagged)."""
  names = chip_lib.FAMILIES[st.family]
  if len(st.values) != len(names) or len(st.spans) != len(names):
    raise ValueError(f"caption has {len(st.spans)} clauses, the {st.family} schema has "
                     f"{len(names)} {names}: {st.caption!r}")
  for k, (start, end) in enumerate(st.spans):
    if end <= start:
      raise ValueError(f"clause {k} ({names[k]}) has an empty value span: {st.caption!r}")
  ids, clause = tokenizer.encode_caption(st, max_len)
  texts = [ids] + [tokenizer.encode_caption(st, max_len, skip=k)[0] if np.any(clause == k)
                   else ids for k in range(len(names))]
  return ids, clause, np.stack(texts)


def _candidate(tokenizer, st, ids, clause, k) -> text_lib.StructuredText | None:
  """The rewritten structured text of a filled row, or None if the filled value is unusable."""
  value = tokenizer.decode(ids[clause == k]).strip()
  if not value or value == st.values[k] or text_lib.SEPARATOR.strip() in value:
    return None
  return table_lib.rewritten(st, {k: value})


def _choose(tokenizer, rank: RankFn, pool: values_lib.ValuePool, images: np.ndarray,
            sts: list, flag: np.ndarray, fills: dict, n_values: int, max_len: int) -> dict:
  """{row: rewritten text} for the flagged rows: the decoder's fill (`fills`, row -> text or
  None) or one of the field's `n_values` most frequent other values, whichever caption the
  decoder finds most likely given the image. Every row ranks 1 + n_values texts (its last
  option repeated where it has fewer), so the ranking function sees one shape."""
  width = 1 + n_values
  options = {}
  for r in np.flatnonzero(flag >= 0):
    k = int(flag[r])
    free = [fills[r]] if fills.get(r) is not None else []
    taken = tuple(c.values[k] for c in free)
    options[r] = free + [table_lib.rewritten(sts[r], {k: v})
                         for v in pool.others(sts[r], k, n_values, exclude=taken)]
  options = {r: o for r, o in options.items() if o}
  if not options:
    return {}
  texts = np.zeros((len(images), width, max_len), np.int32)
  for r, opts in options.items():
    for j in range(width):
      texts[r, j] = tokenizer.encode_caption(opts[min(j, len(opts) - 1)], max_len)[0]
  texts[:, :, 0] = DEC
  logp = rank(images, texts)
  return {r: opts[int(np.argmax(logp[r, :len(opts)]))] for r, opts in options.items()}


def run_pass(table: table_lib.PairTable, source, preprocess, tokenizer, score: ScoreFn,
             fill: FillFn | None, *, stage: Stage, cfg, max_len: int,
             rank: RankFn | None = None, pool: values_lib.ValuePool | None = None,
             after_chunk: Callable[[], None] | None = None):
  """Rescores the next slice of `table`; returns (table version + 1, PassResult).

  preprocess: the evaluation Preprocess (no augmentation, no table) that makes the images.
  score(images, texts [n, V, L]) -> (cosine, match) [n, V]; fill(images, ids, clause, k) ->
  (ids, clause) as `predict.fill_span`, used in the RECONSTRUCT stage, with rank(images,
  texts [n, V, L]) -> decoder log-likelihoods [n, V] and the value `pool` when
  `cfg.fill_candidates` > 0. Chunks have
  `cfg.batch_size` rows (the last one padded). `after_chunk` runs after each scored chunk (the
  trainer's fault hook).
  """
  n_values = int(cfg.get("fill_candidates", 0))
  if stage == Stage.RECONSTRUCT and n_values and (rank is None or pool is None):
    raise ValueError(f"scio.fill_candidates={n_values} needs the decoder's ranking function "
                     "and the value pool")
  start = time.time()
  new = table.copy()
  new.version = table.version + 1
  rows = pass_rows(table.version, len(table), cfg.slice_size)
  flagged = np.full(len(rows), -1, np.int32)
  rewritten = np.zeros(len(rows), bool)
  change = np.zeros((len(rows), 2), np.float32)
  done = np.zeros(len(rows), bool)
  for lo in range(0, len(rows), cfg.batch_size):
    chunk = rows[lo:lo + cfg.batch_size]
    images, texts, full, sts, kept = [], [], [], [], []
    for j, i in enumerate(chunk):
      record = source[int(i)]
      if table_lib.example_id(record) != table.ids[i]:
        raise table_lib.TableMismatchError(
            f"record {i} has id {table_lib.example_id(record)!r} but the pair table expects "
            f"{table.ids[i]!r}")
      example = preprocess.random_map((int(i), record), None)  # evaluation: no randomness
      if not example["valid"]:
        continue  # unreadable: not rescored
      st = table_lib.rewritten(schema.structured_text(record), table.rewrites.get(int(i), {}))
      ids, clause, variants = caption_texts(tokenizer, st, max_len)
      images.append(example["image"])
      texts.append(variants)
      full.append((ids, clause))
      sts.append(st)
      kept.append(lo + j)
    if not kept:
      continue
    n = len(kept)
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], cfg.batch_size - n, axis=0)])
    images, texts = pad(np.stack(images)), pad(np.stack(texts))
    cosine, match = (x[:n] for x in score(images, texts))
    flag = screen(cosine, match, cfg.margin_cosine, cfg.margin_match)
    take = np.where(flag >= 0, flag + 1, 0)
    kept_scores = np.stack([cosine[np.arange(n), take], match[np.arange(n), take]], axis=1)
    accepted = np.zeros(n, bool)
    if stage == Stage.RECONSTRUCT and np.any(flag >= 0):
      ids = pad(np.stack([f[0] for f in full]))
      clause = pad(np.stack([f[1] for f in full]))
      k = np.full(len(ids), -1, np.int32)
      k[:n] = flag
      new_ids, new_clause = fill(images, ids, clause, k)
      candidates = {r: _candidate(tokenizer, sts[r], new_ids[r], new_clause[r], flag[r])
                    for r in np.flatnonzero(flag >= 0)}
      if n_values:
        candidates = _choose(tokenizer, rank, pool, images, sts, flag, candidates,
                             n_values, max_len)
      candidates = {r: c for r, c in candidates.items() if c is not None}
      if candidates:
        cand_texts = texts[:, :1].copy()
        for r, c in candidates.items():
          cand_texts[r, 0] = tokenizer.encode_caption(c, max_len)[0]
        cos_r, match_r = (x[:n, 0] for x in score(images, cand_texts))
        for r, c in candidates.items():
          if cos_r[r] > cosine[r, 0] and match_r[r] > match[r, 0]:
            accepted[r] = True
            kept_scores[r] = (cos_r[r], match_r[r])
            i = int(rows[kept[r]])
            new.rewrites.setdefault(i, {})[int(flag[r])] = c.values[flag[r]]
    for r, pos in enumerate(kept):
      i = int(rows[pos])
      new.dropped[i] = -1 if accepted[r] else flag[r]
      new.weight[i] = pair_weight(kept_scores[r, 1], cfg.weight_floor)
      new.scores[i] = (cosine[r, 0], match[r, 0], *kept_scores[r])
      new.scored_version[i] = new.version
      flagged[pos], rewritten[pos], done[pos] = flag[r], accepted[r], True
      change[pos] = kept_scores[r] - (cosine[r, 0], match[r, 0])
    if after_chunk is not None:
      after_chunk()
  result = PassResult(stage=stage, rows=rows[done], flagged=flagged[done],
                      rewritten=rewritten[done], score_change=change[done],
                      seconds=time.time() - start)
  return new, result
