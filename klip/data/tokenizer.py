"""SentencePiece tokenizer: one per run, trained on the pretraining corpus, kept in the workdir.

Reserved ids: 0 pad, 1 unk, then the control tokens [ENC] (first token of every text: pooled
for contrast), [DEC] (decoder start), [MASK], [SEP] (clause separator). Byte fallback is on, so
no text is ever out of vocabulary.

Captions are tokenized piece by piece (template text, value spans, separators), so the token
positions of every value span are exact.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable

import numpy as np
from etils import epath

from klip import paths
from klip.data import caption as caption_lib
from klip.data import text as text_lib
from klip.data.caption import DEC, ENC, MASK, PAD, SEP, SPECIALS, TEMPLATE, UNK



class Tokenizer:
  """A loaded SentencePiece model plus the caption encoding with value-span positions."""

  def __init__(self, path: str):
    """path: local or gs:// (a run's workdir may be on GCS)."""
    self.path = path
    self._proto = epath.Path(path).read_bytes()
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top  (the step needs only ids)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    got = tuple(self._sp.id_to_piece(i) for i in (ENC, DEC, MASK, SEP))
    if self._sp.pad_id() != PAD or self._sp.unk_id() != UNK or got != SPECIALS:
      raise ValueError(f"{path}: not a KLIP tokenizer (pad={self._sp.pad_id()}, "
                       f"unk={self._sp.unk_id()}, ids 2-5={got}, expected {SPECIALS})")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def fingerprint(self) -> str:
    return hashlib.sha256(self._proto).hexdigest()[:16]

  def encode_pieces(self, text: str) -> list[int]:
    return self._sp.encode(text) if text.strip() else []

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) > SEP])

  def encode_text(self, text: str, max_len: int) -> np.ndarray:
    """[ENC] + tokens of free text (a prompt, a generated caption), the field separator as
    [SEP], padded/truncated to max_len: int32 [max_len]."""
    ids = [ENC]
    for j, part in enumerate(text.split(caption_lib.SEPARATOR)):
      ids.extend(([SEP] if j else []) + self.encode_pieces(part))
    ids = ids[:max_len]
    return np.asarray(ids + [PAD] * (max_len - len(ids)), np.int32)

  def encode_caption(self, st: text_lib.StructuredText, max_len: int, skip: int = -1):
    """[ENC] + caption tokens (separator as [SEP]), padded/truncated to max_len.

    Returns (ids int32 [max_len], clause int32 [max_len]) where clause[t] is the index of the
    field whose value span token t belongs to, or TEMPLATE. skip >= 0 leaves clause `skip` out
    (its template prefix, value span and one separator); the other clauses keep their indices.
    """
    ids, clause = [ENC], [TEMPLATE]
    for piece, index in (st.segments() if skip < 0 else _segments_without(st, skip)):
      parts = piece.split(caption_lib.SEPARATOR) if index == TEMPLATE else [piece]
      for j, part in enumerate(parts):
        if j:
          ids.append(SEP)
          clause.append(TEMPLATE)
        tokens = self.encode_pieces(part)
        ids.extend(tokens)
        clause.extend([index] * len(tokens))
    ids, clause = ids[:max_len], clause[:max_len]
    pad = max_len - len(ids)
    return (np.asarray(ids + [PAD] * pad, np.int32),
            np.asarray(clause + [TEMPLATE] * pad, np.int32))


def _segments_without(st: text_lib.StructuredText, k: int) -> list[tuple[str, int]]:
  """`st.segments()` with the characters of clause k cut out: for k > 0 the separator before
  it, its prefix and its value; for clause 0 its prefix, its value and the separator after it."""
  n = len(st.spans)
  if not 0 <= k < n:
    raise ValueError(f"cannot leave out clause {k}: the caption has {n} clauses")
  sep = caption_lib.SEPARATOR
  cut_start = 0 if k == 0 else st.spans[k - 1][1]
  cut_end = st.spans[k][1] + (len(sep) if k == 0 and n > 1 else 0)
  boundary = st.spans[0][1] if k == 0 else cut_start
  if n > 1 and st.caption[boundary:boundary + len(sep)] != sep:
    raise ValueError(f"clause {k} of {st.caption!r} is not delimited by {sep!r}")
  out, cursor = [], 0
  for piece, index in st.segments():
    start, end = cursor, cursor + len(piece)
    cursor = end
    if end <= cut_start or start >= cut_end:
      out.append((piece, index))
    elif index == TEMPLATE:
      kept = piece[:max(0, cut_start - start)] + piece[min(len(piece), cut_end - start):]
      if kept:
        out.append((kept, index))
  return out


def train(texts: Iterable[str], path: str, vocab_size: int, *, seed: int = 0) -> Tokenizer:
  """Trains a BPE SentencePiece model on `texts` and writes it to `path` (local or gs://)."""
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    n = 0
    with open(corpus, "w") as f:
      for t in texts:
        f.write(t.replace(caption_lib.SEPARATOR, "\n").replace("\n\n", "\n") + "\n")
        n += 1
    if not n:
      raise ValueError("cannot train a tokenizer on an empty corpus")
    model = io.BytesIO()
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=corpus, model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=-1,
        eos_id=-1, control_symbols=list(SPECIALS), hard_vocab_limit=False,
        input_sentence_size=1_000_000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    paths.write_atomic(path, model.getvalue())
  return Tokenizer(path)


def install(src: str, dst: str) -> Tokenizer:
  """Copies a user-supplied tokenizer into the workdir after validating it."""
  Tokenizer(src)
  paths.write_atomic(dst, epath.Path(src).read_bytes())
  return Tokenizer(dst)
