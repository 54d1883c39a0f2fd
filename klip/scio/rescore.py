"""The SCIO rescoring pass: score each pair's clauses, screen, proofread, reconstruct.

For each pair the full caption (rewrites applied, nothing dropped) and, by `scio.screen`, its K
leave-one-clause-out variants ("leave_one_out", the method's) or its observable clauses alone
each against its field's frequent other values ("clause", `klip/scio/clauses.py`) are scored
with `predict.score` (cosine and ITM match probability) by one jitted function sharded like the
train step: in each call the image side is computed once per image and reused for its texts
(the clause screen makes two calls a chunk, full captions and clauses). A clause's
*rise* is what both scores gain when it goes (leave-one-out) or when its best rival replaces it
(clause). The decisions are made on the host:

  screen       the clause whose rise is above its field's margins in BOTH scores; among
               several, the one furthest past them in its field's spreads; else none.
  proofread    the flagged clause is dropped from the training caption, and the pair weight is
               floor + (1 - floor) * match probability of the kept caption (`scio.weight_floor`):
               pairs the model still finds inconsistent count less, never below the floor.
  reconstruct  (last stage) with the clause screen, the flagged clause takes its best rival's
               value, which beat it past the margins. With leave-one-out, the value span is
               refilled greedily by `predict.fill_span`; with `scio.fill_candidates` = N > 0
               the field's N most frequent other values (`values.ValuePool`) compete with that
               fill, and the decoder's log-likelihood of each whole caption
               (`predict.text_logprob`) picks one; the rewrite is kept only if the rewritten
               caption beats the original on both scores. A kept rewrite's clause is no longer
               dropped.

The margins are per field and calibrated on every pass from the pass's own rises
(`klip/scio/margins.py`).

The pass scores all its chunks first, calibrates, then decides per chunk; a chunk with a
flagged clause (clause screen) or in the reconstruct stage reads its records again for the kept
captions and the fill rather than holding every image of the pass.
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
from klip.data import content as content_lib
from klip.data import schema
from klip.data import text as text_lib
from klip.data import values as values_lib
from klip.data.caption import DEC, PAD, TEMPLATE
from klip.scio import clauses
from klip.scio import margins as margins_lib
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
# Decisions (host, numpy); the screen's margins are klip/scio/margins.py's.
# ---------------------------------------------------------------------------------------------
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
  """What one pass did: rows rescored, clause flagged per row (-1), rewrites kept, the
  screen's margins, time, and the rows it could not rescore (image unreadable, caption without
  the schema's clauses)."""
  stage: Stage
  rows: np.ndarray           # int [n] table rows rescored
  flagged: np.ndarray        # int32 [n]
  rewritten: np.ndarray      # bool [n]
  score_change: np.ndarray   # float32 [n, 2] (cosine, match) of the kept minus the full caption
  margins: margins_lib.Margins  # the screen's margins for each field
  seconds: float
  unreadable: int = 0
  malformed: int = 0

  def metrics(self) -> dict[str, float]:
    n = max(len(self.rows), 1)
    change = self.score_change.mean(axis=0) if len(self.rows) else np.zeros(2)
    margins = {f"scio/margin_{score}/{field}": float(self.margins.value[f, j])
               for j, score in enumerate(("cosine", "match"))
               for f, field in enumerate(margins_lib.FIELDS)}
    return {"scio/rescored": float(len(self.rows)), "scio/stage": float(self.stage),
            "scio/flag_rate": float(np.sum(self.flagged >= 0) / n),
            "scio/rewrite_rate": float(np.sum(self.rewritten) / n),
            "scio/mean_cosine_change": float(change[0]),
            "scio/mean_match_change": float(change[1]),
            "scio/mean_score_change": float(change.mean()),
            "scio/skipped_unreadable": float(self.unreadable),
            "scio/skipped_malformed": float(self.malformed),
            "scio/pass_seconds": self.seconds,
            "scio/seconds_per_pair": self.seconds / n,
            "scio/calibrated_fields": float(np.sum(self.margins.calibrated)), **margins}


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
  """The rewritten structured text of a filled row, or None if the filled value is unusable
  (empty, holding a separator, or saying what the flagged value says, `content`)."""
  value = tokenizer.decode(ids[clause == k]).strip()
  name = st.field_names[k]
  if (not value or caption_lib.SEPARATOR.strip() in value
      or content_lib.content(name, value) == content_lib.content(name, st.values[k])):
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
    record_id = schema.example_id(record)
    if table_lib.id_hash(record_id) != table.id_hash[i]:
      raise table_lib.TableMismatchError(
          f"record {i} has id {record_id!r} (hash {table_lib.id_hash(record_id)}) but the "
          f"pair table's row {i} holds id hash {int(table.id_hash[i])}")
    example = preprocess.random_map((int(i), record), None)  # evaluation: no randomness
    if not example["valid"]:
      unreadable += 1
      continue
    try:
      st = table_lib.rewritten(schema.structured_text(record), table.rewrites.get(int(i), {}))
      ids, clause, variants = caption_texts(tokenizer, st, max_len)
    except ValueError as e:
      malformed += 1
      logging.warning("SCIO: pair %d (%s) not rescored: %s", int(i), record_id, e)
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


def _fields(sts: list, full: list) -> np.ndarray:
  """[n, K] the field of each clause of each row (`margins.FIELD_OF`), -1 where the clause was
  cut off by the token budget (its variant is the full caption: it cannot be judged)."""
  out = np.full((len(sts), caption_lib.CLAUSES), -1, np.int32)
  for r, (st, (_, clause)) in enumerate(zip(sts, full)):
    judged = np.isin(np.arange(caption_lib.CLAUSES), clause)
    out[r] = np.where(judged, margins_lib.FIELD_OF[st.family], -1)
  return out


def _gathered(processes: inference_lib.Processes, x: np.ndarray, capacity: int,
              fill) -> np.ndarray:
  """Every process's rows of x in process order, each process's padded to `capacity` rows
  with `fill` (the caller tells padding from rows by it: field -1, table row -1)."""
  if processes.count == 1:
    return x
  x = np.concatenate([x, np.full((capacity - len(x), *x.shape[1:]), fill, x.dtype)])
  return processes.gather(x).reshape(-1, *x.shape[1:])


def run_pass(table: table_lib.PairTable, source, preprocess, tokenizer, score: ScoreFn,
             fill: FillFn | None, *, stage: Stage, cfg, max_len: int,
             rank: RankFn | None = None, pool: values_lib.ValuePool | None = None,
             clause_len: int = 0, after_chunk: Callable[[], None] | None = None,
             processes: inference_lib.Processes | None = None):
  """Rescores the next slice of `table`; returns (table version + 1, PassResult).

  preprocess: the evaluation Preprocess (no augmentation, no table) that makes the images.
  score(images, texts [n, V, L]) -> (cosine, match) [n, V]; fill(images, ids, clause, k) ->
  (ids, clause) as `predict.fill_span`, used in the RECONSTRUCT stage, with rank(images,
  texts [n, V, L]) -> decoder log-likelihoods [n, V] and the value `pool` when
  `cfg.fill_candidates` > 0. With `cfg.screen` "clause" (`clauses`), score also takes each
  row's clauses alone ([n, V, clause_len]) against the value `pool`'s rivals, and the flagged
  clause's best rival is the rewrite (no fill, no rank). Chunks have `cfg.batch_size` rows (the
  last one padded).
  `after_chunk` runs after each scored chunk (the trainer's fault hook).

  With several processes (`processes`, default this run's) every process calls this with the
  same table and rescores its share of each chunk (`processes.local_batch` rows): score, fill
  and rank are collectives over those shares, every process takes the same branches, the
  rises are exchanged before the screen (every process calibrates on all of them) and the
  decisions at the end, so every process returns the same table. A pair whose
  image does not decode or whose caption is malformed is skipped, counted and logged.
  """
  n_values = int(cfg.fill_candidates)
  by_clause = clauses.check(cfg.screen) == "clause"
  if by_clause and (pool is None or clause_len <= 0):
    raise ValueError("scio.screen='clause' needs the value pool and the clause length "
                     f"(loss.clause_max_len > 0), got clause_len={clause_len}")
  if (stage == Stage.RECONSTRUCT and n_values and not by_clause
      and (rank is None or pool is None)):
    raise ValueError(f"scio.fill_candidates={n_values} needs the decoder's ranking function "
                     "and the value pool")
  width = clauses.SLOTS * (1 + int(cfg.screen_candidates))
  processes = processes or inference_lib.Processes()
  per = processes.local_batch(cfg.batch_size)
  image_shape = (preprocess.image_size, preprocess.image_size, preprocess.channels)
  start = time.time()
  rows = pass_rows(table.version, len(table), cfg.slice_size)
  capacity = -(-len(rows) // cfg.batch_size) * per  # the most rows a process rescores
  # Scoring: every chunk's scores first, so that the margins rest on the whole pass.
  chunks = []  # (table rows read, rises [n, K, 2], field [n, K], cosine, match)
  unreadable = malformed = 0
  for lo in range(0, len(rows), cfg.batch_size):
    own = rows[lo:lo + cfg.batch_size][processes.index * per:(processes.index + 1) * per]
    kept, images, texts, full, sts, bad_image, bad_text = _read(own, table, source, preprocess,
                                                               tokenizer, max_len)
    unreadable, malformed, n = unreadable + bad_image, malformed + bad_text, len(kept)
    images = _padded(images, per, image_shape, np.float32)
    if by_clause:  # the full caption, then every judged clause and its rivals alone
      cosine, match = (x[:n] for x in score(images, _padded([t[:1] for t in texts], per,
                                                            (1, max_len), np.int32)))
      opts = [clauses.options(tokenizer, st, pool, cfg.screen_candidates, clause_len)
              for st in sts]
      c_cos, c_match = (x[:n] for x in score(images, _padded([o[0] for o in opts], per,
                                                             (width, clause_len), np.int32)))
      rise, rival, field = clauses.rises(c_cos, c_match, [st.family for st in sts])
      chosen = [{k: clauses.rival_value(o[1], st.family, k, rival[r, k])
                 for k in clauses.JUDGED[st.family]} for r, (st, o) in enumerate(zip(sts, opts))]
    else:
      cosine, match = (x[:n] for x in score(images, _padded(texts, per, (caption_lib.CLAUSES + 1,
                                                                         max_len), np.int32)))
      rise, field, chosen = margins_lib.rises(cosine, match), _fields(sts, full), None
    chunks.append((own[kept], rise, field, cosine, match, chosen))
    if after_chunk is not None:
      after_chunk()
  # Calibration: every process's rises, so that every process computes the same margins.
  pass_rise = _gathered(processes, np.concatenate([c[1] for c in chunks]), capacity, 0.0)
  pass_field = _gathered(processes, np.concatenate([c[2] for c in chunks]), capacity, -1)
  margins = margins_lib.field_margins(pass_rise, pass_field, rate=cfg.false_flag_rate,
                          floor=(cfg.margin_cosine, cfg.margin_match),
                          min_rows=cfg.calibration_min_rows)
  # Decisions, chunk by chunk.
  done, flagged, accepted, scores, rewrites = [], [], [], [], {}
  for own, rise, field, cosine, match, chosen in chunks:
    n = len(own)
    flag = margins_lib.screen(rise, field, margins)
    take = np.zeros(n, np.int64) if by_clause else np.where(flag >= 0, flag + 1, 0)
    kept_scores = np.stack([cosine[np.arange(n), take], match[np.arange(n), take]], axis=1)
    taken = np.zeros(n, bool)
    if by_clause and processes.any(np.any(flag >= 0)):
      # the kept captions (without the flagged clause, or with its best rival) scored whole,
      # for the pair weight and the table
      _, images, texts, _, sts, _, _ = _read(own, table, source, preprocess, tokenizer,
                                             max_len)
      kept_texts = np.zeros((per, 1, max_len), np.int32)
      for r in range(n):
        kept_texts[r, 0] = texts[r][flag[r] + 1]  # flag -1: the full caption
        value = chosen[r].get(int(flag[r]))
        if stage == Stage.RECONSTRUCT and value is not None and value != sts[r].values[flag[r]]:
          rewrite = table_lib.rewritten(sts[r], {int(flag[r]): value})
          kept_texts[r, 0] = tokenizer.encode_caption(rewrite, max_len)[0]
          taken[r] = True
          rewrites[int(own[r])] = (int(flag[r]), value)
      cos_k, match_k = (x[:n, 0] for x in score(_padded(images, per, image_shape, np.float32),
                                                kept_texts))
      kept_scores = np.where((flag >= 0)[:, None], np.stack([cos_k, match_k], axis=1),
                             kept_scores)
    elif stage == Stage.RECONSTRUCT and processes.any(np.any(flag >= 0)):
      # the chunk's records again (they read as before: the evaluation preprocessing)
      _, images, texts, full, sts, _, _ = _read(own, table, source, preprocess, tokenizer,
                                                max_len)
      images = _padded(images, per, image_shape, np.float32)
      texts = _padded(texts, per, (caption_lib.CLAUSES + 1, max_len), np.int32)
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
            rewrites[int(own[r])] = (int(flag[r]), c.values[flag[r]])
    done.extend(int(i) for i in own)
    flagged.append(flag)
    accepted.append(taken)
    scores.append(np.concatenate([np.stack([cosine[:, 0], match[:, 0]], axis=1), kept_scores],
                                 axis=1).astype(np.float32))
  local = _Outcomes(np.asarray(done, np.int64), np.concatenate(flagged).astype(np.int32),
                    np.concatenate(accepted), np.concatenate(scores).reshape(-1, 4),
                    rewrites, unreadable, malformed)
  every = local.exchanged(processes, capacity)
  new = every.applied(table, cfg.weight_floor)
  position = np.empty(len(table), np.int64)
  position[rows] = np.arange(len(rows))
  order = np.argsort(position[every.rows])  # pass order
  result = PassResult(stage=stage, rows=every.rows[order], flagged=every.flagged[order],
                      rewritten=every.accepted[order],
                      score_change=(every.scores[:, 2:] - every.scores[:, :2])[order],
                      margins=margins,
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
    rows = _gathered(processes, self.rows, capacity, -1)
    real = rows >= 0
    gathered = lambda x: _gathered(processes, x, capacity, 0)[real]  # noqa: E731
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
