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
import logging
import time
from collections.abc import Callable

import numpy as np

from klip import inference as inference_lib
from klip import predict
from klip.data import caption as caption_lib
from klip.data import schema
from klip.data import text as text_lib
from klip.data import values as values_lib
from klip.data.caption import DEC, PAD, TEMPLATE
from klip.scio import table as table_lib


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
# The model's scores, through the one prediction harness.
# ---------------------------------------------------------------------------------------------
class ModelScorer:
  """The pass's predictions of one train state (`inference.Inference` with
  `model_of=lambda s: s.model`) on this process's rows: score, fill and rank as `run_pass`
  takes them."""

  def __init__(self, inference: inference_lib.Inference, state, *, max_span: int):
    self.inference, self._state, self._max_span = inference, state, max_span

  @property
  def processes(self) -> inference_lib.Processes:
    return self.inference.processes

  def score(self, images: np.ndarray, texts: np.ndarray):
    """(cosine, match) [n, V] of images [n, H, W, C] against their texts [n, V, L]."""
    return self.inference(inference_lib.variant_scores, self._state, images, texts)

  def rank(self, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Decoder log-likelihood [n, V] of each of the V [DEC]-first texts [n, V, L] of image n."""
    return self.inference(inference_lib.variant_logprobs, self._state, images, texts)

  def fill(self, images, ids, clause, k):
    """`predict.fill_span` (greedy) of clause k[b] of each row (-1: unchanged)."""
    tokens = self.inference(inference_lib.image_tokens, self._state, images)
    generate = self.inference.generator(self._state, tokens, max_new=self._max_span)
    return predict.fill_span(generate, ids, clause, k)


# ---------------------------------------------------------------------------------------------
# The pass.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PassResult:
  """What one pass did: rows rescored, clause flagged per row (-1), rewrites kept, time, and
  the rows it could not rescore (image unreadable, caption without the schema's clauses)."""
  stage: Stage
  rows: np.ndarray           # int [n] table rows rescored
  flagged: np.ndarray        # int32 [n]
  rewritten: np.ndarray      # bool [n]
  score_change: np.ndarray   # float32 [n, 2] (cosine, match) of the kept minus the full caption
  seconds: float
  unreadable: int = 0
  malformed: int = 0

  def metrics(self) -> dict[str, float]:
    n = max(len(self.rows), 1)
    change = self.score_change.mean(axis=0) if len(self.rows) else np.zeros(2)
    return {"scio/rescored": float(len(self.rows)), "scio/stage": float(self.stage),
            "scio/flag_rate": float(np.sum(self.flagged >= 0) / n),
            "scio/rewrite_rate": float(np.sum(self.rewritten) / n),
            "scio/mean_cosine_change": float(change[0]),
            "scio/mean_match_change": float(change[1]),
            "scio/mean_score_change": float(change.mean()),
            "scio/skipped_unreadable": float(self.unreadable),
            "scio/skipped_malformed": float(self.malformed),
            "scio/pass_seconds": self.seconds,
            "scio/seconds_per_pair": self.seconds / n}


def caption_texts(tokenizer, st: text_lib.StructuredText, max_len: int):
  """(full ids [L], full clause [L], texts [K + 1, L]): the caption and its K leave-one-
  clause-out variants at the same token budget. Raises ValueError for a caption that does not
  have the schema's clauses or has an empty value span.

  Variant k is the full caption's own max_len tokens with clause k's tokens (its template
  prefix, value and one separator) taken out, so a clause that max_len cut off never comes back
  in a variant: a rise in score when clause k goes is then clause k's doing alone. A clause
  whose value is cut off entirely cannot be judged: its variant is the full caption (no rise,
  so it is never flagged)."""
  names = caption_lib.FAMILIES[st.family]
  if len(st.values) != len(names) or len(st.spans) != len(names):
    raise ValueError(f"caption has {len(st.spans)} clauses, the {st.family} schema has "
                     f"{len(names)} {names}: {st.caption!r}")
  for k, (start, end) in enumerate(st.spans):
    if end <= start:
      raise ValueError(f"clause {k} ({names[k]}) has an empty value span: {st.caption!r}")
  # every token of the caption ([ENC], at most 4 byte pieces per character, no more [SEP]s
  # than clauses)
  whole, whole_clause = tokenizer.encode_caption(st, 1 + 4 * len(st.caption) + len(names))
  used = min(int(np.sum(whole != PAD)), max_len)
  extra = max(0, max_len - whole.size)  # the max_len encoding is this one's prefix
  ids = np.pad(whole[:max_len], (0, extra), constant_values=PAD)
  clause = np.pad(whole_clause[:max_len], (0, extra), constant_values=TEMPLATE)
  last = lambda k: int(np.flatnonzero(whole_clause == k)[-1])
  texts = [ids]
  for k in range(len(names)):
    if not np.any(clause == k):
      texts.append(ids)
      continue
    # clause 0: [ENC] | prefix, value, [SEP] | ...; clause k > 0: ... value k-1 | [SEP],
    # prefix, value | ...
    cut = (1, last(0) + 2) if k == 0 else (last(k - 1) + 1, last(k) + 1)
    kept = np.concatenate([whole[:cut[0]], whole[cut[1]:used]])
    texts.append(np.pad(kept, (0, max_len - kept.size), constant_values=PAD))
  return ids, clause, np.stack(texts)


def _candidate(tokenizer, st, ids, clause, k) -> text_lib.StructuredText | None:
  """The rewritten structured text of a filled row, or None if the filled value is unusable."""
  value = tokenizer.decode(ids[clause == k]).strip()
  if not value or value == st.values[k] or caption_lib.SEPARATOR.strip() in value:
    return None
  return table_lib.rewritten(st, {k: value})


def _choose(tokenizer, rank: RankFn, pool: values_lib.ValuePool, images: np.ndarray,
            sts: list, flag: np.ndarray, fills: dict, n_values: int, max_len: int) -> dict:
  """{row: rewritten text} for the flagged rows: the decoder's fill (`fills`, row -> text or
  None) or one of the field's `n_values` most frequent other values, whichever caption the
  decoder finds most likely given the image. Every row ranks 1 + n_values texts (its last
  option repeated where it has fewer), so the ranking function sees one shape; it runs even
  when no row has an option (every process ranks together)."""
  width = 1 + n_values
  options = {}
  for r in np.flatnonzero(flag >= 0):
    k = int(flag[r])
    free = [fills[r]] if fills.get(r) is not None else []
    taken = tuple(c.values[k] for c in free)
    options[r] = free + [table_lib.rewritten(sts[r], {k: v})
                         for v in pool.others(sts[r], k, n_values, exclude=taken)]
  options = {r: o for r, o in options.items() if o}
  texts = np.zeros((len(images), width, max_len), np.int32)
  for r, opts in options.items():
    for j in range(width):
      texts[r, j] = tokenizer.encode_caption(opts[min(j, len(opts) - 1)], max_len)[0]
  texts[:, :, 0] = DEC
  logp = rank(images, texts)
  return {r: opts[int(np.argmax(logp[r, :len(opts)]))] for r, opts in options.items()}


def _read(rows: np.ndarray, table: table_lib.PairTable, source, preprocess, tokenizer,
          max_len: int):
  """The model inputs of table rows: (positions in `rows` read, images, texts [n, K + 1, L],
  (ids, clause) of the full captions, structured texts, unreadable, malformed). Rows whose image
  does not decode or whose caption does not have the schema's clauses are left out, counted."""
  kept, images, texts, full, sts = [], [], [], [], []
  unreadable = malformed = 0
  for j, i in enumerate(rows):
    record = source[int(i)]
    if schema.example_id(record) != table.ids[i]:
      raise table_lib.TableMismatchError(
          f"record {i} has id {schema.example_id(record)!r} but the pair table expects "
          f"{table.ids[i]!r}")
    example = preprocess.random_map((int(i), record), None)  # evaluation: no randomness
    if not example["valid"]:
      unreadable += 1
      continue
    try:
      st = table_lib.rewritten(schema.structured_text(record), table.rewrites.get(int(i), {}))
      ids, clause, variants = caption_texts(tokenizer, st, max_len)
    except ValueError as e:
      malformed += 1
      logging.warning("SCIO: pair %d (%s) not rescored: %s", int(i), table.ids[i], e)
      continue
    kept.append(j)
    images.append(example["image"])
    texts.append(variants)
    full.append((ids, clause))
    sts.append(st)
  return kept, images, texts, full, sts, unreadable, malformed


def _padded(rows: list, size: int, shape: tuple, dtype) -> np.ndarray:
  """rows stacked and padded to `size` with copies of the first (zeros if there is none):
  every process hands in the same shape."""
  if not rows:
    return np.zeros((size, *shape), dtype)
  out = np.stack(rows).astype(dtype, copy=False)
  return np.concatenate([out, np.repeat(out[:1], size - len(rows), axis=0)])


def run_pass(table: table_lib.PairTable, source, preprocess, tokenizer, score: ScoreFn,
             fill: FillFn | None, *, stage: Stage, cfg, max_len: int,
             rank: RankFn | None = None, pool: values_lib.ValuePool | None = None,
             after_chunk: Callable[[], None] | None = None,
             processes: inference_lib.Processes | None = None):
  """Rescores the next slice of `table`; returns (table version + 1, PassResult).

  preprocess: the evaluation Preprocess (no augmentation, no table) that makes the images.
  score(images, texts [n, V, L]) -> (cosine, match) [n, V]; fill(images, ids, clause, k) ->
  (ids, clause) as `predict.fill_span`, used in the RECONSTRUCT stage, with rank(images,
  texts [n, V, L]) -> decoder log-likelihoods [n, V] and the value `pool` when
  `cfg.fill_candidates` > 0. Chunks have `cfg.batch_size` rows (the last one padded).
  `after_chunk` runs after each scored chunk (the trainer's fault hook).

  With several processes (`processes`, default this run's) every process calls this with the
  same table and rescores its share of each chunk (`processes.local_batch` rows): score, fill
  and rank are collectives over those shares, every process takes the same branches, and the
  decisions are exchanged at the end, so every process returns the same table. A pair whose
  image does not decode or whose caption is malformed is skipped, counted and logged.
  """
  n_values = int(cfg.fill_candidates)
  if stage == Stage.RECONSTRUCT and n_values and (rank is None or pool is None):
    raise ValueError(f"scio.fill_candidates={n_values} needs the decoder's ranking function "
                     "and the value pool")
  processes = processes or inference_lib.Processes()
  per = processes.local_batch(cfg.batch_size)
  image_shape = (preprocess.image_size, preprocess.image_size, preprocess.channels)
  start = time.time()
  rows = pass_rows(table.version, len(table), cfg.slice_size)
  done, flagged, accepted, scores, rewrites = [], [], [], [], {}
  unreadable = malformed = 0
  for lo in range(0, len(rows), cfg.batch_size):
    own = rows[lo:lo + cfg.batch_size][processes.index * per:(processes.index + 1) * per]
    kept, images, texts, full, sts, bad_image, bad_text = _read(own, table, source, preprocess,
                                                               tokenizer, max_len)
    unreadable, malformed, n = unreadable + bad_image, malformed + bad_text, len(kept)
    images = _padded(images, per, image_shape, np.float32)
    texts = _padded(texts, per, (caption_lib.CLAUSES + 1, max_len), np.int32)
    cosine, match = (x[:n] for x in score(images, texts))
    flag = screen(cosine, match, cfg.margin_cosine, cfg.margin_match)
    take = np.where(flag >= 0, flag + 1, 0)
    kept_scores = np.stack([cosine[np.arange(n), take], match[np.arange(n), take]], axis=1)
    taken = np.zeros(n, bool)
    if stage == Stage.RECONSTRUCT and processes.any(np.any(flag >= 0)):
      ids = _padded([f[0] for f in full], per, (max_len,), np.int32)
      clause = _padded([f[1] for f in full], per, (max_len,), np.int32)
      k = np.full(per, -1, np.int32)
      k[:n] = flag
      new_ids, new_clause = fill(images, ids, clause, k)
      candidates = {r: _candidate(tokenizer, sts[r], new_ids[r], new_clause[r], flag[r])
                    for r in np.flatnonzero(flag >= 0)}
      if n_values:
        candidates = _choose(tokenizer, rank, pool, images, sts, flag, candidates,
                             n_values, max_len)
      candidates = {r: c for r, c in candidates.items() if c is not None}
      if processes.any(bool(candidates)):
        cand_texts = texts[:, :1].copy()
        for r, c in candidates.items():
          cand_texts[r, 0] = tokenizer.encode_caption(c, max_len)[0]
        cos_r, match_r = (x[:n, 0] for x in score(images, cand_texts))
        for r, c in candidates.items():
          if cos_r[r] > cosine[r, 0] and match_r[r] > match[r, 0]:
            taken[r] = True
            kept_scores[r] = (cos_r[r], match_r[r])
            rewrites[int(own[kept[r]])] = (int(flag[r]), c.values[flag[r]])
    done.extend(int(own[j]) for j in kept)
    flagged.append(flag)
    accepted.append(taken)
    scores.append(np.concatenate([np.stack([cosine[:, 0], match[:, 0]], axis=1), kept_scores],
                                 axis=1).astype(np.float32))
    if after_chunk is not None:
      after_chunk()
  local = _Outcomes(np.asarray(done, np.int64), np.concatenate(flagged).astype(np.int32),
                    np.concatenate(accepted), np.concatenate(scores).reshape(-1, 4),
                    rewrites, unreadable, malformed)
  every = local.exchanged(processes, capacity=-(-len(rows) // cfg.batch_size) * per)
  new = every.applied(table, cfg.weight_floor)
  position = np.empty(len(table), np.int64)
  position[rows] = np.arange(len(rows))
  order = np.argsort(position[every.rows])  # pass order
  result = PassResult(stage=stage, rows=every.rows[order], flagged=every.flagged[order],
                      rewritten=every.accepted[order],
                      score_change=(every.scores[:, 2:] - every.scores[:, :2])[order],
                      seconds=time.time() - start, unreadable=every.unreadable,
                      malformed=every.malformed)
  return new, result


@dataclasses.dataclass(frozen=True)
class _Outcomes:
  """What a pass decided about the rows it rescored (one process's, or all of them)."""
  rows: np.ndarray       # int64 [n] table rows
  flagged: np.ndarray    # int32 [n]
  accepted: np.ndarray   # bool [n] rewrite kept
  scores: np.ndarray     # float32 [n, 4] as table_lib.SCORE_COLUMNS
  rewrites: dict         # {row: (clause, value)} of the accepted rewrites
  unreadable: int
  malformed: int

  def exchanged(self, processes: inference_lib.Processes, capacity: int) -> _Outcomes:
    """Every process's outcomes (rows in process order). `capacity`: the most rows a process
    can have rescored, to which each pads its arrays for the exchange."""
    if processes.count == 1:
      return self
    n = len(self.rows)
    pad = lambda x, fill: np.concatenate([x, np.full((capacity - n, *x.shape[1:]), fill,
                                                      x.dtype)])
    rows = processes.gather(pad(self.rows, -1))
    real = rows >= 0
    gathered = lambda x: processes.gather(pad(x, 0))[real]
    rewrites, unreadable, malformed = {}, 0, 0
    for part in processes.gather_json([list(self.rewrites.items()), self.unreadable,
                                       self.malformed]):
      rewrites.update({int(r): (int(k), v) for r, (k, v) in part[0]})
      unreadable, malformed = unreadable + part[1], malformed + part[2]
    return _Outcomes(rows[real], gathered(self.flagged), gathered(self.accepted),
                     gathered(self.scores), rewrites, unreadable, malformed)

  def applied(self, table: table_lib.PairTable, floor: float) -> table_lib.PairTable:
    """The next version of `table` with these outcomes."""
    new = table.copy()
    new.version = table.version + 1
    for row, (k, value) in self.rewrites.items():
      new.rewrites.setdefault(row, {})[k] = value
    for j, row in enumerate(self.rows):
      new.dropped[row] = -1 if self.accepted[j] else self.flagged[j]
      new.weight[row] = pair_weight(self.scores[j, 3], floor)
      new.scores[row] = self.scores[j]
      new.scored_version[row] = new.version
    return new
