"""SCIO's clause screen (`scio.screen="clause"`): each observable clause against its rivals.

The method's screen (`rescore.caption_texts`) scores the caption with and without each clause;
one value of eight moves a whole caption's embedding little, and on the pairs a model trained
on it tells a planted value from the true one no better than chance (README, SCIO). The clause
screen scores each observable clause alone on the image, "prefix value" as the clause contrast
trains it (`loss.clause_contrast_weight`, `loss.clause_max_len` tokens), against the same
clause with each of its field's `scio.screen_candidates` most frequent other values
(`values.ValuePool`): clause k's rise is the best rival's score minus its own, for the cosine
and the match probability of the same rival (the rival with the higher cosine), so
`margins.field_margins` and `margins.screen` calibrate and flag these rises as they do the
leave-one-out ones. A flagged clause is dropped (proofread) and, in the reconstruct stage,
rewritten to that rival. Only the fields the pixels can show (`caption.OBSERVABLE_FIELDS`) are
judged: a place name's rivals score what the image cannot tell. The clause contrast trains the
cosine of a clause alone; the matching head never sees one in training, but its logit adds the
pair's scaled cosine (`model.match_cosine`), and on `tiny` it told planted values from true
ones as often as the cosine did (README, "The clause screen"). The trainer refuses the clause
screen when the clause contrast is off (`check_config`).
"""

from __future__ import annotations

import numpy as np

from klip.data import caption as caption_lib
from klip.data import text as text_lib
from klip.data import values as values_lib

SCREENS = ("leave_one_out", "clause")
# Every field of every family in caption order, a field two families share once: the screens'
# margins are per field (`margins.FIELDS` is this).
FIELDS = tuple(dict.fromkeys(f for names in caption_lib.FAMILIES.values() for f in names))
FIELD_INDEX = {f: i for i, f in enumerate(FIELDS)}
# The observable clauses of each family, in caption order: the clause screen's slots.
JUDGED = {family: tuple(k for k, name in enumerate(names)
                        if name in caption_lib.OBSERVABLE_FIELDS)
          for family, names in caption_lib.FAMILIES.items()}
SLOTS = max(len(k) for k in JUDGED.values())


def check(screen: str) -> str:
  if screen not in SCREENS:
    raise ValueError(f"scio.screen={screen!r}: expected one of {SCREENS}")
  return screen


def check_config(config) -> None:
  """Raises ValueError, at the start of a run, for a SCIO config the screen cannot work with."""
  if check(config.scio.screen) != "clause":
    return
  if config.scio.screen_candidates < 1:
    raise ValueError(f"scio.screen_candidates={config.scio.screen_candidates}: the clause "
                     "screen needs at least one rival a clause")
  if config.loss.clause_contrast_weight <= 0 or config.loss.clause_max_len <= 0:
    raise ValueError(
        "scio.screen='clause' scores clauses alone, which the clause contrast trains, but "
        f"loss.clause_contrast_weight={config.loss.clause_contrast_weight} and "
        f"loss.clause_max_len={config.loss.clause_max_len}: turn the clause contrast on or set "
        "scio.screen=leave_one_out")


def options(tokenizer, st: text_lib.StructuredText, pool: values_lib.ValuePool,
            candidates: int, clause_len: int) -> tuple[np.ndarray, list[list[str]]]:
  """(tokens [SLOTS * (1 + candidates), clause_len], values [SLOTS][1 + candidates]): for each
  judged clause of `st`, the clause with its own value, then with each of its field's most
  frequent other values; a clause with fewer rivals, and a family with fewer judged clauses,
  repeat the own clause (a rival that ties never rises)."""
  width = 1 + candidates
  values = []
  for k in JUDGED[st.family]:
    own = st.values[k]
    rivals = pool.others(st, k, candidates)
    values.append([own] + rivals + [own] * (candidates - len(rivals)))
  values += [values[-1]] * (SLOTS - len(values))
  names = [st.field_names[k] for k in JUDGED[st.family]]
  names += [names[-1]] * (SLOTS - len(names))
  tokens = np.stack([tokenizer.encode_text(caption_lib.PREFIXES[name] + v, clause_len)
                     for name, row in zip(names, values) for v in row])
  return tokens.reshape(SLOTS * width, clause_len), values


def rises(cosine: np.ndarray, match: np.ndarray, families: list[str]
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """From the scores [n, SLOTS * (1 + C)] of `options`' texts: (rises [n, K, 2] of the best
  rival over the own clause, best rival [n, K] (1..C, its column in the slot), field of each
  clause [n, K] (-1: not judged)), K = caption.CLAUSES, indexed by clause as
  `margins.rises` is."""
  n, width = len(families), cosine.shape[1] // SLOTS  # n may be 0: a process without rows
  cos = cosine.reshape(n, SLOTS, width)
  mat = match.reshape(n, SLOTS, width)
  best = 1 + np.argmax(cos[:, :, 1:], axis=-1)  # [n, SLOTS]
  pick = lambda s: np.take_along_axis(s, best[..., None], -1)[..., 0] - s[..., 0]  # noqa: E731
  slot_rise = np.stack([pick(cos), pick(mat)], axis=-1)
  out = np.zeros((n, caption_lib.CLAUSES, 2), np.float32)
  rival = np.zeros((n, caption_lib.CLAUSES), np.int32)
  field = np.full((n, caption_lib.CLAUSES), -1, np.int32)
  for r, family in enumerate(families):
    judged = list(JUDGED[family])
    out[r, judged] = slot_rise[r, :len(judged)]
    rival[r, judged] = best[r, :len(judged)]
    field[r, judged] = [FIELD_INDEX[caption_lib.FAMILIES[family][k]] for k in judged]
  return out, rival, field


def rival_value(values: list[list[str]], family: str, k: int, rival: int) -> str:
  """The value of clause k's rival column `rival` in `options`' values of a row."""
  return values[JUDGED[family].index(k)][rival]
