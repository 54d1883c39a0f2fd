"""Deterministic consistency checks of a chip's data and of the field values written for it.

`contradictions(chip)` lists what the chip's own data contradicts (a ship whose box centre is on
land, a count that does not match the instances, a size impossible for the category or at that
resolution, a polarisation or band the platform does not have, a category the target family does
not know). The consistency level (L5) repairs these or marks the field uncertain.

`check(chip, family, values)` lists what the eight field values get wrong: a stated count, length,
3x3 position, category, band or polarisation that the chip's data contradicts, a presence or
absence of water, buildings or roads that the land cover contradicts, and any unresolved
contradiction of the chip in a field not marked uncertain (its value contains HEDGE), except
count and size, which are settled by stating the trusted value (REPAIRABLE). The
generator raises when `check` finds anything; the build report counts its findings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

from klip.data import caption as caption_lib
from klip.data import chip as chip_lib
from klip.data import knowledge
from klip.hcot import measure

HEDGE = "uncertain"
# The field that states the sensor and scattering physics, per family.
PHYSICS_FIELD = {"target": "feature", "landform": "boundary"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")
# A presence field says ABSENT exactly when its land-cover classes cover nothing.
PRESENCE = {"water": ("water",), "buildings": ("urban",), "roads": ("road", "runway")}
ABSENT = "absent"
# Fields whose data contradictions are settled by stating the trusted value (checked as such).
REPAIRABLE = ("count", "size")

_NUMBER = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_METRES = re.compile(r"(\d+(?:\.\d+)?)\s*(?:m|metres|meters)\b")
_BAND = re.compile(r"\b(P|L|S|C|X|Ku|Ka)-band\b")
_POL = re.compile(r"\b(HH|HV|VH|VV)\b")
_CELL = re.compile(r"\b(" + "|".join(sorted(chip_lib.GRID_NAMES, key=len, reverse=True)) + r")\b")


@dataclasses.dataclass(frozen=True)
class Violation:
  """One contradiction: the field it concerns and why."""
  field: str
  reason: str


def stated_number(value: str) -> int | None:
  """The first number a value states, in digits or words, or None."""
  m = _NUMBER.search(value)
  if m is None:
    return None
  word = m.group(1).lower()
  return int(word) if word.isdigit() else NUMBER_WORDS.index(word)


def expected_count(chip: chip_lib.Chip) -> int | None:
  """The count the text must state: the annotated instances, else the metadata count."""
  if chip.instances:
    return len(chip.instances)
  return chip.count if chip.count >= 0 else None


def platform_problems(imaging: chip_lib.Imaging) -> list[str]:
  """What the knowledge base's platform table contradicts in the imaging metadata."""
  platform = next((p for p in knowledge.platforms() if p.name == imaging.platform), None)
  if platform is None:
    return []
  out = []
  if imaging.band != platform.band:
    out.append(f"{imaging.platform} is {platform.band}-band, the metadata says "
               f"{imaging.band}-band")
  modes = [m for m in platform.modes if m.name == imaging.mode] or list(platform.modes)
  if not any(set(imaging.polarisations) <= set(c) for m in modes for c in m.polarisations):
    out.append(f"{imaging.platform} {imaging.mode} does not deliver "
               f"{'/'.join(imaging.polarisations)}")
  return out


def contradictions(chip: chip_lib.Chip) -> list[Violation]:
  """What the chip's own data contradicts, each with the field that must repair or hedge it."""
  out = [Violation(PHYSICS_FIELD[chip.family], p) for p in platform_problems(chip.imaging)]
  if chip.family != "target":
    return out
  categories = knowledge.objects().categories
  mpp = measure.metres_per_pixel(chip)
  if chip.instances and chip.count >= 0 and chip.count != len(chip.instances):
    out.append(Violation("count", f"the metadata count {chip.count} differs from the "
                                  f"{len(chip.instances)} annotated instances"))
  for i, inst in enumerate(chip.instances):
    if inst.category not in categories:
      out.append(Violation("category", f"instance {i}: {inst.category!r} is not a target "
                                       f"category of the knowledge base"))
      continue
    s = measure.size(chip, inst)
    if not math.isfinite(s.length_m):
      out.append(Violation("size", f"instance {i}: no plausible {inst.category} length "
                                   f"(box {s.box_length_m:.0f} m at {mpp:g} m per pixel)"))
    elif not s.box_agrees:
      out.append(Violation("size", f"instance {i}: the box spans {s.box_length_m:.0f} m but the "
                                   f"{s.source} length is {s.length_m:.0f} m"))
    elif math.isfinite(inst.length_m) and s.source != "AIS":
      out.append(Violation("size", f"instance {i}: the reported length {inst.length_m:g} m is "
                                   f"impossible for a {inst.category} at {mpp:g} m per pixel"))
    if inst.category == "ship" and chip.landcover is not None:
      h, w = chip.landcover.shape
      cx = min(int(0.5 * (inst.box[0] + inst.box[2])), w - 1)
      cy = min(int(0.5 * (inst.box[1] + inst.box[3])), h - 1)
      cover = chip_lib.LANDCOVER_CLASSES[chip.landcover[cy, cx]]
      if cover != "water":
        out.append(Violation("environment", f"instance {i}: a ship whose centre lies on {cover}"))
  return out


def check(chip: chip_lib.Chip, family: str, values: Sequence[str]) -> list[Violation]:
  """What the eight field `values` (in the family's field order) get wrong about `chip`."""
  if family not in caption_lib.FAMILIES:
    return [Violation("family", f"unknown family {family!r}")]
  names = caption_lib.FAMILIES[family]
  if family != chip.family:
    return [Violation("family", f"the chip is a {chip.family} chip, not {family}")]
  if len(values) != len(names):
    return [Violation("family", f"{len(values)} values for the {len(names)} fields {names}")]
  v = dict(zip(names, values))
  hedged = {name for name, value in v.items() if HEDGE in value.lower()}
  out = [c for c in contradictions(chip) if c.field not in REPAIRABLE]
  out += _sensor(chip, v[PHYSICS_FIELD[family]], PHYSICS_FIELD[family])
  if family == "target":
    out += _count(chip, v["count"]) + _location(chip, v["location"])
    out += _category(chip, v["category"]) + _size(chip, v["size"], "size" in hedged)
  elif chip.landcover is not None:
    out += _presence(chip, v)
  return [o for o in out if o.field not in hedged or o.field == "size"]


def _sensor(chip: chip_lib.Chip, value: str, field: str) -> list[Violation]:
  out = [Violation(field, f"names {b}-band, the chip is {chip.imaging.band}-band")
         for b in sorted(set(_BAND.findall(value))) if b != chip.imaging.band]
  out += [Violation(field, f"names {p}, the chip has {'/'.join(chip.imaging.polarisations)}")
          for p in sorted(set(_POL.findall(value))) if p not in chip.imaging.polarisations]
  return out


def _count(chip: chip_lib.Chip, value: str) -> list[Violation]:
  expected = expected_count(chip)
  stated = stated_number(value)
  if expected is None or stated == expected:
    return []
  return [Violation("count", f"states {stated} targets, the chip has {expected}")]


def _location(chip: chip_lib.Chip, value: str) -> list[Violation]:
  if not chip.instances:
    return []
  h, w = chip.image_db.shape[:2]
  cells = {chip_lib.GRID_NAMES[chip_lib.grid_cell(i.box, h, w)] for i in chip.instances}
  return [Violation("location", f"names the {c}, where no target is")
          for c in sorted(set(_CELL.findall(value)) - cells)]


def _category(chip: chip_lib.Chip, value: str) -> list[Violation]:
  objects = knowledge.objects()
  present = {i.category for i in chip.instances} & set(objects.categories)
  text = value.lower()
  for sub in objects.subtypes:
    if sub.category in present:
      text = text.replace(sub.label.lower(), sub.category)
  out = []
  for name, cls in objects.categories.items():
    said = re.search(rf"\b({re.escape(cls.singular)}|{re.escape(cls.plural)}|{name})\b", text)
    if name in present and not said:
      out.append(Violation("category", f"does not name the {cls.plural} that are present"))
    if name not in present and said:
      out.append(Violation("category", f"names {cls.plural}, none are present"))
  return out


def _size(chip: chip_lib.Chip, value: str, hedged: bool) -> list[Violation]:
  known = [i for i in chip.instances if i.category in knowledge.objects().categories]
  sizes = [measure.size(chip, i) for i in known]
  if any(not math.isfinite(s.length_m) for s in sizes):
    return [] if hedged else [Violation("size", "a target has no plausible size and the field "
                                                "is not marked uncertain")]
  m = _METRES.search(value)
  if not sizes or m is None:
    return []
  stated, mpp = float(m.group(1)), measure.metres_per_pixel(chip)
  lengths = [s.length_m for s in sizes]
  if not min(lengths) / 1.6 - mpp <= stated <= max(lengths) * 1.6 + mpp:
    return [Violation("size", f"states {stated:g} m, the targets measure "
                              f"{min(lengths):.0f}-{max(lengths):.0f} m")]
  return []


def _presence(chip: chip_lib.Chip, v: dict[str, str]) -> list[Violation]:
  shares = measure.fractions(chip.landcover)
  out = []
  for field, classes in PRESENCE.items():
    share = sum(shares[c] for c in classes)
    says_absent = ABSENT in v[field].lower()
    if says_absent != (share == 0):
      out.append(Violation(field, f"says {'absent' if says_absent else 'present'}, the land "
                                  f"cover has {100 * share:.1f} % {'/'.join(classes)}"))
  return out
