"""Captioning: generated captions against the reference captions of a split.

Each image gets a caption of its record's family from `Predictor.caption` (the template
prefixes forced, each value span decoded greedily or by beam search: the generation SCIO uses),
scored against the record's caption with pycocoevalcap (one reference per image):

- `bleu4`: corpus BLEU-4 (n-gram precisions pooled over the split, closest-length brevity
  penalty), as `pycocoevalcap.bleu.bleu.Bleu(4)` computes it;
- `cider`: CIDEr-D as `pycocoevalcap.cider.cider.Cider` computes it (x10, with IDF weights from
  the split's references, so values depend on the split; template n-grams shared by every
  reference weigh nothing);
- `rouge_l`: the mean ROUGE-L F-measure (beta 1.2) of `pycocoevalcap.rouge.rouge.Rouge`.

Tokenisation (`normalize`) is our own: lower case, cut at every non-alphanumeric character (so
the " $ " separators and punctuation drop out), tokens joined by single spaces. The COCO
PTBTokenizer is not used because it runs Java. METEOR is left out: no maintained offline Python
implementation exists (the COCO one is a Java jar), and SPICE likewise needs Java.

Intervals (95 %, bootstrap over images): CIDEr and ROUGE-L are means of the per-image scores
pycocoevalcap returns, so their intervals resample those (CIDEr's IDF is not re-estimated per
resample). Corpus BLEU-4 is not a mean of per-image scores: its interval resamples each image's
BLEU statistics (pycocoevalcap's own n-gram counts from `cook_refs`/`cook_test`) and recomputes
the corpus score from the resampled sums (`corpus_bleu`), which on the whole split is
pycocoevalcap's value.

Field accuracy: a generated caption is cut back into its eight values (`field_values`: between
the known template prefixes and separators); a value is correct when it equals the record's
reference value after `normalize` (case and punctuation ignored). Reported per field name
(`field/<name>`, over the images whose family has it) and over all fields (`field_accuracy`,
the interval over images of each image's fraction of correct fields). Then `num_examples`.
A reference value longer than `max_span` tokens, or past the model's max_len decoding buffer,
cannot be matched, so the accuracy of long fields is bounded by those two settings.

Content accuracy (`content/<name>`, `content_accuracy`): the same comparison on what a value
says that the pixels can show (`content`), not on its wording. The HCoT generator words one
fact several ways at random ("3", "three ships", "3 ships") and writes metadata into some
observable fields (terrain names the city, water its incidence angle), so exact match caps a
captioner that sees perfectly far below 1 (count at about a third); `klip/data/content.py`
says what the content of each field is.

Repetition (`repetition`): the share of the non-empty generated values (all eight fields of
every image) in which a phrase of one to REPEAT_NGRAM (4) tokens occurs REPEAT_RUN (3) or more
times in a row, tokens as `normalize` cuts them ("of of of", "the port area of the port area of
the port area of"): the degenerate loops of a decoder that has not learnt when to stop, which
field accuracy alone does not show. Interval over those values.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

import numpy as np
from pycocoevalcap.bleu import bleu_scorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from evals import stats
from klip.data import caption as caption_lib
from klip.data.content import content, normalize
from klip.data import schema

BLEU_N = 4
EXAMPLES = 8  # reference-vs-generated rows in the report
REPEAT_RUN = 3  # a value with a phrase this many times in a row counts as repeating
REPEAT_NGRAM = 4  # the longest phrase (in tokens) looked for


def field_values(caption: str, family: str) -> list[str]:
  """The eight values of a `family` caption composed as `text.compose` composes them (each
  field's template prefix, values between, SEPARATOR between clauses; a value may be empty)."""
  names = caption_lib.FAMILIES[family]
  starts, ends, cursor = [], [], 0
  for i, name in enumerate(names):
    marker = (caption_lib.SEPARATOR if i else "") + caption_lib.PREFIXES[name]
    at = caption.find(marker, cursor)
    if at < 0 or (i == 0 and at > 0):
      raise ValueError(f"not a {family} caption (no {marker!r} clause): {caption!r}")
    ends.append(at)
    cursor = at + len(marker)
    starts.append(cursor)
  return [caption[a:b].strip() for a, b in zip(starts, ends[1:] + [len(caption)])]


def bleu_statistics(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
  """Per-image BLEU statistics [N, 2 + 2 * BLEU_N] of normalised captions: hypothesis length,
  reference length, then the n-gram counts and the clipped n-gram matches for n = 1..BLEU_N,
  counted by pycocoevalcap's `cook_refs` / `cook_test`."""
  rows = []
  for ref, hyp in zip(references, hypotheses, strict=True):
    cooked = bleu_scorer.cook_test(hyp, bleu_scorer.cook_refs([ref], n=BLEU_N), n=BLEU_N)
    rows.append([cooked["testlen"], cooked["reflen"][0], *cooked["guess"], *cooked["correct"]])
  return np.asarray(rows, np.float64).reshape(-1, 2 + 2 * BLEU_N)


def corpus_bleu(statistics: np.ndarray) -> float:
  """Corpus BLEU-BLEU_N of summed `bleu_statistics`, with the smoothing constants and brevity
  penalty of pycocoevalcap's `BleuScorer.compute_score` (one reference, so "closest" length is
  the reference length)."""
  tiny, small = 1e-15, 1e-9
  total = np.sum(statistics, axis=0)
  hyp_len, ref_len = total[0], total[1]
  guess, correct = total[2:2 + BLEU_N], total[2 + BLEU_N:]
  bleu = np.prod((correct + tiny) / (guess + small)) ** (1.0 / BLEU_N)
  ratio = (hyp_len + tiny) / (ref_len + small)
  return float(bleu * (np.exp(1 - 1 / ratio) if ratio < 1 else 1.0))


def caption_scores(references: Sequence[str], hypotheses: Sequence[str]
                   ) -> Iterator[tuple[str, float]]:
  """bleu4, cider and rouge_l of captions against their references, with intervals."""
  refs = [normalize(t) for t in references]
  hyps = [normalize(t) for t in hypotheses]
  yield from stats.with_ci("bleu4", bleu_statistics(refs, hyps), statistic=corpus_bleu)
  gts = {i: [r] for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  for name, scorer in (("cider", Cider()), ("rouge_l", Rouge())):
    _, per_image = scorer.compute_score(gts, res)
    yield from stats.with_ci(name, np.asarray(per_image, np.float64))


KEYS = {"field": lambda name, value: normalize(value), "content": content}


def field_matches(records: Sequence[dict], captions: Sequence[str], key: str = "field"
                  ) -> list[dict[str, bool]]:
  """Per image, field name -> whether the generated value equals the reference value, as
  text (`key` "field") or in what it says (`key` "content", `content`)."""
  same = KEYS[key]
  out = []
  for record, caption in zip(records, captions, strict=True):
    names = [schema.text_of(n) for n in record["field_names"]]
    generated = field_values(caption, schema.text_of(record["family"]))
    out.append({name: same(name, g) == same(name, schema.text_of(ref))
                for name, g, ref in zip(names, generated, record["field_values"], strict=True)})
  return out


def constant_matches(train_records: Sequence[dict], records: Sequence[dict],
                     key: str = "field") -> list[dict[str, bool]]:
  """`field_matches` of the constant captioner: for every (family, field), the value most
  frequent in `train_records` (as `key` reads it), whatever the image. The reference a
  captioner that reads no pixels reaches; ties go to the value first seen."""
  same = KEYS[key]
  counts = collections.defaultdict(collections.Counter)
  for record in train_records:
    family = schema.text_of(record["family"])
    for name, value in zip(record["field_names"], record["field_values"], strict=True):
      name = schema.text_of(name)
      counts[family, name][same(name, schema.text_of(value))] += 1
  best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
  out = []
  for record in records:
    family = schema.text_of(record["family"])
    out.append({schema.text_of(name): best.get((family, schema.text_of(name))) ==
                same(schema.text_of(name), schema.text_of(value))
                for name, value in zip(record["field_names"], record["field_values"],
                                       strict=True)})
  return out


def field_accuracy(matches: Sequence[dict[str, bool]], key: str = "field"
                   ) -> Iterator[tuple[str, float]]:
  """`<key>_accuracy` over all fields and `<key>/<name>` per field name, with intervals."""
  yield from stats.with_ci(f"{key}_accuracy", np.array([np.mean(list(m.values()))
                                                        for m in matches]))
  by_field = collections.defaultdict(list)
  for m in matches:
    for name, hit in m.items():
      by_field[name].append(float(hit))
  for name in sorted(by_field):
    yield from stats.with_ci(f"{key}/{name}", np.array(by_field[name]))


def repeats(value: str, run: int = REPEAT_RUN, longest: int = REPEAT_NGRAM) -> bool:
  """Whether a phrase of 1 to `longest` `normalize` tokens of `value` occurs `run` or more times
  in a row ("of of of", "the port area of the port area of the port area of")."""
  tokens = normalize(value).split()
  for n in range(1, longest + 1):
    same = 0  # tokens in a row equal to the token n before: the phrase spans n + same tokens
    for i in range(n, len(tokens)):
      same = same + 1 if tokens[i] == tokens[i - n] else 0
      if same >= (run - 1) * n:
        return True
  return run <= 1 and bool(tokens)


def repetition(captions: Sequence[str], families: Sequence[str]) -> np.ndarray:
  """Per non-empty generated value of the captions (in order), 1.0 if it `repeats`."""
  return np.array([float(repeats(v)) for caption, family in zip(captions, families, strict=True)
                   for v in field_values(caption, family) if normalize(v)], np.float64)


class Evaluator:
  """Captions the images of `split` of dataset `data` and scores them."""

  def __init__(self, predictor, datasets, *, data: str, split: str, beam_size: int = 1,
               max_span: int = 12, max_examples: int | None = None):
    self.predictor = predictor
    self.datasets = datasets
    self.data = data
    self.split = split
    self.beam_size = beam_size
    self.max_span = max_span
    self.max_examples = max_examples

  def run(self, artifacts) -> Iterator[tuple[str, float]]:
    split = self.datasets.split(self.data, self.split, max_examples=self.max_examples)
    references = split.texts("caption")
    generated = self._generate(split.records, split.texts("family"))
    yield from caption_scores(references, generated)
    matches = field_matches(split.records, generated)
    yield from field_accuracy(matches)
    yield from field_accuracy(field_matches(split.records, generated, "content"), "content")
    repeated = repetition(generated, split.texts("family"))
    if repeated.size:
      yield from stats.with_ci("repetition", repeated)
    yield "num_examples", float(len(split))
    artifacts.text(f"{len(split)} images of {split.name}:{split.split}, beam size "
                   f"{self.beam_size}, at most {self.max_span} tokens per value.")
    artifacts.table(
        "Reference and generated captions", ["id", "reference", "generated", "fields right"],
        [[i, ref, gen, f"{sum(m.values())}/{len(m)}"] for i, ref, gen, m in
         list(zip(split.ids, references, generated, matches))[:EXAMPLES]])

  def _generate(self, records: Sequence[dict], families: Sequence[str]) -> list[str]:
    """One caption per record, of its family (one `Predictor.caption` call per family)."""
    image_tokens = self.predictor.image_tokens(self.predictor.images(records))
    out = [""] * len(records)
    b = self.predictor.batch_size
    for family in sorted(set(families)):
      rows = [i for i, f in enumerate(families) if f == family]
      # Padded to whole batches (repeating the last image) so every call has one shape and
      # generation compiles once for all families and group sizes.
      padded = rows + rows[-1:] * (-len(rows) % b)
      captions = self.predictor.caption(image_tokens[padded], family, max_span=self.max_span,
                                        beam_size=self.beam_size)
      for i, caption in zip(rows, captions):
        out[i] = caption
    return out
