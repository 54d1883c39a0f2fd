"""Grain input pipeline: records -> SAR preprocessing + tokens -> per-process batches.

Determinism contract: position p of the (shuffled, repeated) example stream is fixed by the
seed alone, and the global batch at step s is positions [s*B, (s+1)*B). Process k of P loads
the k-th of P equal slices of it, so the set of example ids at step s does not depend on the
process count, and the data position stored in a checkpoint is the number of examples seen.

A record that fails to read or decode does not stop the run: it becomes an example with
`valid == 0` (zeros elsewhere), which the losses ignore and the trainer counts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import grain
import numpy as np
from PIL import Image

from klip.data import caption as caption_lib
from klip.data import negatives as negatives_lib
from klip.data import values as values_lib
from klip.data import schema
from klip.data import text as text_lib
from klip.data import tokenizer as tokenizer_lib

_LOGGED_ERRORS = 5


class SafeSource:
  """Random access to (record index, record or None); read/decode errors become None."""

  def __init__(self, source, name: str):
    self._source = source
    self._name = name
    self._errors = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return index, self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      self._errors += 1
      if self._errors <= _LOGGED_ERRORS:
        logging.warning("%s: record %d cannot be read, skipped: %r", self._name, index, e)
      return index, None


class Overrides(Protocol):
  """What the pipeline asks of per-example overrides of the text and weight."""

  def apply(self, index: int, record_id: str, st: text_lib.StructuredText
            ) -> tuple[text_lib.StructuredText, int, float]:
    """(structured text, clause to leave out or -1, pair weight) of record `index`."""


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.RandomMap):
  """One record -> model inputs. Holds only plain values so it pickles to worker processes."""
  tokenizer_path: str
  image_size: int
  channels: int
  max_len: int
  db_min: float
  db_max: float
  train: bool
  gain_db: float = 0.0  # uniform calibration-gain jitter in dB (speckle-preserving)
  # Training crops of chips larger than the model input lie within max_shift pixels of the
  # centre crop (-1: anywhere): real chips are centred on their target, which a crop from
  # anywhere would cut off while the caption still places it in the centre.
  max_shift: int = -1
  # Training images mirrored top to bottom (along azimuth) with probability flip_p, the
  # position words of the caption mirrored with them (`text.flip_vertical`). A mirror along
  # azimuth keeps the radar's look direction, so layover and shadow fall as before.
  flip_p: float = 0.0
  # Clause-level contrast (`loss.clause_contrast_weight`): each example also carries
  # `clause_tokens` [clause_len], one of its observable clauses (template prefix + value, the
  # form of a zero-shot prompt) drawn at random; 0: none.
  clause_len: int = 0
  # Per-example overrides (the view of SCIO's pair table): rewritten values, a
  # dropped clause (left out of the tokens) and the pair's weight; a record whose id the
  # overrides do not expect raises schema.RecordMismatch and stops the run.
  table: Overrides | None = None
  # Clause-swap negatives (`loss.clause_negatives`): each example also carries `swap_tokens`,
  # its caption with one observable value swapped, and `has_swap` (0 where none could be made).
  swap: bool = False
  # Clause rivals (`loss.clause_rivals`, with clause_len): each example also carries
  # `rival_tokens` [rivals, clause_len], its drawn clause with other values of that field, and
  # `has_rival` [rivals] (0 for padding: the field has fewer other values, a rival that
  # clause_len cuts off to the clause itself, an unreadable record).
  rivals: int = 0
  # The values swaps and rivals are drawn from (klip/data/negatives.py).
  pool: values_lib.ValuePool | None = None

  def __post_init__(self):
    if (self.swap or self.rivals or self.clause_len) and not self.train:
      raise ValueError("clause tokens, swaps and rivals are drawn at random: they need "
                       "train=True")
    if (self.swap or self.rivals) and self.pool is None:
      raise ValueError("clause negatives and rivals draw their values from a pool: pass pool=")
    if self.rivals and not self.clause_len:
      raise ValueError("clause rivals are rivals of the drawn clause: they need clause_len > 0")

  def random_map(self, element, rng: np.random.Generator):
    index, record = element
    try:
      if record is None:
        raise ValueError("unreadable record")
      return self._example(index, record, rng)
    except schema.RecordMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("record %d skipped: %r", index, e)
      return self._invalid(index)

  def _tokenizer(self) -> tokenizer_lib.Tokenizer:
    tok = self.__dict__.get("_tok")
    if tok is None:  # loaded lazily, once per worker process
      tok = tokenizer_lib.Tokenizer(self.tokenizer_path)
      object.__setattr__(self, "_tok", tok)
    return tok

  def _example(self, index: int, record, rng: np.random.Generator) -> dict:
    image = self.image(schema.decode_image(record), rng)
    st, skip, weight = schema.structured_text(record), -1, 1.0
    if self.table is not None:
      st, skip, weight = self.table.apply(index, schema.example_id(record), st)
    if self.train and self.flip_p and rng.random() < self.flip_p:
      image, st = image[::-1].copy(), text_lib.flip_vertical(st)
    tokens, clause = self._tokenizer().encode_caption(st, self.max_len, skip=skip)
    out = {"image": image, "tokens": tokens, "clause": clause, "weight": np.float32(weight),
           "valid": np.int32(1), "index": np.int32(index)}
    if self.clause_len:
      k = _random_clause(st, rng, skip)
      prefix = caption_lib.PREFIXES[st.field_names[k]]
      out["clause_tokens"] = self._tokenizer().encode_text(prefix + st.values[k],
                                                           self.clause_len)
      if self.rivals:
        out.update(self._rivals(st, k, out["clause_tokens"], rng))
    if self.swap:
      swapped = negatives_lib.swap(self.pool, st, rng, skip,
                                   visible=set(clause[clause >= 0].tolist()))
      swap = (self._tokenizer().encode_caption(swapped, self.max_len, skip=skip)[0]
              if swapped is not None else tokens)
      # a swap cut off by max_len leaves the caption unchanged: not a negative
      out.update(swap_tokens=swap, has_swap=np.int32(not np.array_equal(swap, tokens)))
    return out

  def _rivals(self, st: text_lib.StructuredText, k: int, own: np.ndarray,
              rng: np.random.Generator) -> dict:
    """`rival_tokens` / `has_rival`: clause k with other values of its field, padded with
    zero rows; a rival that clause_len cuts off to the clause's own tokens `own` is no
    rival."""
    tokens = np.zeros((self.rivals, self.clause_len), np.int32)
    has = np.zeros((self.rivals,), np.int32)
    prefix = caption_lib.PREFIXES[st.field_names[k]]
    for r, value in enumerate(negatives_lib.rivals(self.pool, st, k, self.rivals, rng)):
      tokens[r] = self._tokenizer().encode_text(prefix + value, self.clause_len)
      has[r] = not np.array_equal(tokens[r], own)
    return {"rival_tokens": tokens, "has_rival": has}

  def image(self, db: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The model input [S, S, channels] in [-1, 1] of a dB image [H, W, C]: cropped (randomly
    in training, centred otherwise) or resampled to S = image_size, clipped to
    [db_min, db_max]."""
    if db.shape[-1] > self.channels:
      raise ValueError(f"image has {db.shape[-1]} channels, model takes {self.channels}")
    db = self._fit(db, rng)
    if self.train and self.gain_db:
      db = db + rng.uniform(-self.gain_db, self.gain_db)
    x = (np.clip(db, self.db_min, self.db_max) - self.db_min) / (self.db_max - self.db_min)
    x = 2.0 * x - 1.0
    image = np.zeros((self.image_size, self.image_size, self.channels), np.float32)
    image[..., :x.shape[-1]] = x  # a single-polarisation chip leaves the second channel at 0
    return image

  def _fit(self, db: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Crops (random in training, centred otherwise) or resamples to image_size.

    Cropping keeps speckle statistics intact; a chip smaller than the model input is
    upsampled in the linear intensity domain, not in dB.
    """
    h, w, _ = db.shape
    s = self.image_size
    if h >= s and w >= s:
      y, x = (h - s) // 2, (w - s) // 2
      if self.train:
        y, x = (self._shift(rng, c, size - s) for c, size in ((y, h), (x, w)))
      return db[y:y + s, x:x + s]
    intensity = 10.0 ** (db / 10.0)
    out = np.stack([np.asarray(Image.fromarray(intensity[..., c]).resize((s, s),
                                                                          Image.BILINEAR))
                    for c in range(db.shape[-1])], axis=-1)
    return 10.0 * np.log10(np.maximum(out, 1e-10))

  def _shift(self, rng: np.random.Generator, centre: int, most: int) -> int:
    """A random crop offset in [0, most], within max_shift of `centre` when that is set."""
    lo, hi = (0, most) if self.max_shift < 0 else (max(centre - self.max_shift, 0),
                                                  min(centre + self.max_shift, most))
    return int(rng.integers(lo, hi + 1))

  def _invalid(self, index: int) -> dict:
    out = {"image": np.zeros((self.image_size, self.image_size, self.channels), np.float32),
           "tokens": np.zeros((self.max_len,), np.int32),
           "clause": np.full((self.max_len,), caption_lib.TEMPLATE, np.int32),
           "weight": np.float32(0.0), "valid": np.int32(0), "index": np.int32(index)}
    if self.clause_len:
      out["clause_tokens"] = np.zeros((self.clause_len,), np.int32)
    if self.rivals:
      out.update(rival_tokens=np.zeros((self.rivals, self.clause_len), np.int32),
                 has_rival=np.zeros((self.rivals,), np.int32))
    if self.swap:
      out.update(swap_tokens=np.zeros((self.max_len,), np.int32), has_swap=np.int32(0))
    return out


def _random_clause(st: text_lib.StructuredText, rng: np.random.Generator, skip: int) -> int:
  """The index of one clause of `st`, drawn among its observable fields (all fields when it
  has none), never the clause `skip` that SCIO left out."""
  names = st.field_names
  pick = [i for i, n in enumerate(names) if n in caption_lib.OBSERVABLE_FIELDS and i != skip]
  pick = pick or [i for i in range(len(names)) if i != skip]
  return pick[int(rng.integers(len(pick)))]


def local_batches(source, preprocess: Preprocess, *, seed: int, global_batch: int,
                  start_example: int, process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, num_threads: int = 2, name: str = "data"):
  """An iterator over this process's share of the global batches.

  The first global batch is stream positions [start_example, start_example + global_batch):
  a resumed run passes the number of examples it has consumed.
  """
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} does not divide into {process_count} "
                     "processes")
  local = global_batch // process_count
  ds = grain.MapDataset.source(SafeSource(source, name)).seed(seed).shuffle().repeat()
  ds = ds.random_map(preprocess)  # seeded by stream position: same augmentation on resume
  ds = ds[start_example:].batch(local, drop_remainder=True)
  ds = ds[process_index::process_count]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
  if num_workers:
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
