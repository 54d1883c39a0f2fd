"""What a caption value says that the pixels can show, wording aside.

The HCoT generator words one fact several ways at random ("3", "three ships", "3 ships") and
writes metadata into some observable fields (terrain names the city, water its incidence
angle). Two values with the same `content` say the same thing of the image, so:

- the captioning evaluator scores content accuracy on it (`evals/captioning.py`);
- the value pool never offers a value with the clause's own content as another value of the
  field (`values.ValuePool.others` / `alternatives`): a clause-swap negative, a clause rival,
  a SCIO screen rival or a reconstruct option that only rewords the clause is not wrong, and
  asking the model to score it below the clause asks it to read wording off the pixels;
- bench/scio.py plants only values whose content differs, and counts a rewrite right when it
  restores the true value's content.

The content of count is the number; of location the set of grid cells; of size the numbers it
states; of terrain the cover class before "within/on/in the <landform> of <place>"; of water and
buildings the part before "covering about N %"; of distribution "single" for every
single-target form; of every other field the normalised value.
"""

from __future__ import annotations

import re

from klip.hcot import rules

_NUMBERS = {w: str(i) for i, w in enumerate(rules.NUMBER_WORDS)}
_SINGLE = ("a single ", "one ")  # every wording of distribution "single" starts so
_PLACE = re.compile(r" (?:within|on|in) the ")
_GRID_SPLIT = re.compile(r", | and ")


def normalize(text: str) -> str:
  """Lower-cased alphanumeric tokens of `text`, joined by single spaces."""
  return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def content(field: str, value: str) -> str:
  """What `value` of `field` says that the pixels can show (module docstring); a value without
  the expected form is its normalised text."""
  text = value.strip().lower()
  if field == "count":
    for token in normalize(text).split():
      if token.isdigit() or token in _NUMBERS:
        return _NUMBERS.get(token, token)
  elif field == "location":
    if text.startswith("several parts"):
      return "several, most at " + text.rsplit(" the ", 1)[-1]
    if text.startswith("the ") and text.endswith(" of the image"):
      cells = _GRID_SPLIT.split(text[len("the "):-len(" of the image")])
      return " | ".join(sorted(set(cells)))
  elif field == "size":
    numbers = re.findall(r"\d+(?:\.\d+)?", text)
    if numbers:
      return " ".join(numbers)
  elif field == "terrain":
    return normalize(_PLACE.split(text, maxsplit=1)[0])
  elif field in ("water", "buildings"):
    return normalize(text.split(" covering", 1)[0])
  elif field == "distribution" and text.startswith(_SINGLE):
    return "single"
  return normalize(text)
