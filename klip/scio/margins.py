"""SCIO's screen: each clause's rise against its field's margins, calibrated on every pass.

A clause's *rise* (`rises` for the leave-one-out screen, `clauses.rises` for the clause screen)
is what the cosine and the match probability gain when the clause goes or its best rival
replaces it; the screen (`screen`) flags the clause whose rise passes its field's margins in
both scores, the pass (`rescore.run_pass`) acts on the flag.

The margins are per field (clause k of a caption is field `caption.FAMILIES[family][k]`; a
field two families share is one field) and calibrated on every pass, because a field's rises
on clean pairs can be far wider than another's (a place name the image cannot show against a
count it can), so one absolute margin flags the wide field's clean pairs often and misses the
narrow field's errors. The calibration rests on one assumption: most of a field's pairs in a
pass are clean (the median and the MAD hold while fewer than half are noisy, and a noisy tenth
moves them little), so the pass's own rises estimate the clean distribution. For each field,
over the pass's rows (every process's, exchanged first, so every process computes the same
margins):

  1. each score's rise is standardised by its median and 1.4826 * MAD (the normal's standard
     deviation, robust to the noisy minority): z_cos, z_match;
  2. the screen flags a clause when min(z_cos, z_match) > t; t is that statistic's median +
     z(1 - rate) * its 1.4826 * MAD, with rate = `scio.false_flag_rate`;
  3. the margins are median + t * scale of each score, raised to the absolute floors
     `scio.margin_cosine`, `scio.margin_match` (a flagged clause's removal must really raise
     both scores, and a field whose clean rises hardly vary is not flagged for a rise of 1e-4).

So about `rate` of a field's clean pairs are flagged: `rate` for normal rises whose two scores
move together, 0.75-0.9 * rate (rates of 1-10 %) for independent ones; the floors only lower
it, and so do noisy pairs where they widen the estimates. A caption has eight fields, five of
them judged by the clause screen, so about 1 - (1 - rate)^8 (or ^5) of clean captions lose one
clause. A field with fewer than `scio.calibration_min_rows` judged rows in the pass (with
leave-one-out, a clause cut off by the token budget is not judged) uses the floors alone (and
its rises rank in raw units). Each pass reports the margins it used (`PassResult.margins`,
metrics `scio/margin_cosine/FIELD`, `scio/margin_match/FIELD`, `scio/calibrated_fields`).
"""

from __future__ import annotations

import dataclasses
from statistics import NormalDist

import numpy as np

from klip.data import caption as caption_lib
from klip.scio import clauses

# The screen's margins are per field; FIELD_OF[family][k] is the field of clause k.
FIELDS = clauses.FIELDS
FIELD_OF = {family: np.array([FIELDS.index(f) for f in names], np.int32)
            for family, names in caption_lib.FAMILIES.items()}
MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


def rises(cosine: np.ndarray, match: np.ndarray) -> np.ndarray:
  """[n, K, 2] (cosine, match) of each leave-one-clause-out caption minus the full caption's,
  from scores [n, K + 1] (column 0: full caption, column k + 1: caption without clause k)."""
  return np.stack([cosine[:, 1:] - cosine[:, :1], match[:, 1:] - match[:, :1]], axis=-1)


def _robust(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(median, MAD_TO_SD * median absolute deviation) of x along axis 0."""
  loc = np.median(x, axis=0)
  return loc, MAD_TO_SD * np.median(np.abs(x - loc), axis=0)


@dataclasses.dataclass(frozen=True)
class Margins:
  """The screen's margins for each field of FIELDS."""
  value: np.ndarray       # float [F, 2] (cosine, match) rises a flagged clause must exceed
  scale: np.ndarray       # float [F, 2] the rises' robust spread (1 where not calibrated)
  calibrated: np.ndarray  # bool [F] calibrated on the pass's rows (False: the floors)

  @classmethod
  def floors(cls, floor: tuple) -> Margins:
    """The absolute margins (cosine, match) for every field."""
    n = len(FIELDS)
    return cls(np.tile(np.asarray(floor, np.float64), (n, 1)), np.ones((n, 2)),
               np.zeros(n, bool))


def field_margins(rise: np.ndarray, field: np.ndarray, *, rate: float, floor: tuple,
                  min_rows: int) -> Margins:
  """The margins calibrated on the rises [n, K, 2] of a pass's rows, with the field of each
  clause [n, K] (-1: not judged), as the module docstring says; a field with fewer than
  `min_rows` rows keeps the floors. Computed in float64 from the same rows, they are the same
  on every process whatever the rows' order."""
  if not 0.0 < rate < 1.0:
    raise ValueError(f"scio.false_flag_rate={rate} must be between 0 and 1")
  z = NormalDist().inv_cdf(1.0 - rate)
  out = Margins.floors(floor)
  for f in range(len(FIELDS)):
    r = rise[field == f].astype(np.float64)  # [m, 2]
    if len(r) < max(min_rows, 1):
      continue
    loc, scale = _robust(r)
    scale = np.maximum(scale, 1e-12)  # a score whose rises do not vary: margin = its median
    s_loc, s_scale = _robust(np.min((r - loc) / scale, axis=1))
    out.value[f] = np.maximum(loc + (s_loc + z * s_scale) * scale, out.value[f])
    out.scale[f], out.calibrated[f] = scale, True
  return out


def passing(rise: np.ndarray, field: np.ndarray, margins: Margins) -> np.ndarray:
  """bool [n, K]: clause k's rise passes its field's margins in both scores, from the rises
  [n, K, 2] (`rises` or `clauses.rises`) and the field of each clause [n, K] (-1: not judged,
  never passes)."""
  value = np.where((field >= 0)[..., None], margins.value[field], np.inf)
  return np.all(rise > value, axis=-1)


def screen(rise: np.ndarray, field: np.ndarray, margins: Margins) -> np.ndarray:
  """Flagged clause per pair (-1: none): of the clauses `passing`, the one furthest past its
  margins in its field's spreads (of the score that passes by less), so that a narrow field's
  clear rise wins over a wide field's marginal one."""
  ok = passing(rise, field, margins)
  excess = np.min((rise - margins.value[field]) / margins.scale[field], axis=-1)
  return np.where(ok.any(axis=1), np.argmax(np.where(ok, excess, -np.inf), axis=1),
                  -1).astype(np.int32)
