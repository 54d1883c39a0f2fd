"""The HCoT generator: walks the five levels for one chip and returns its structured text.

    gen = for_backend("rules", data_dir)   # or Generator(make_backend("rules"))
    result = gen.generate(chip)      # result.text is a text.StructuredText

Every answer is validated against its level's schema (`backend.validate`), whatever the backend;
the final fields are re-checked by `consistency.check` and a remaining violation raises
`InconsistentText`. A generator pickles with its backend, so builders can run it in workers.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

from klip.data import chip as chip_lib
from klip.data import text
from klip.hcot import backend as backend_lib
from klip.hcot import consistency
from klip.hcot import levels

# Backend name -> (module, class); modules are imported only when that backend is chosen.
BACKENDS = {"rules": ("klip.hcot.rules", "RulesBackend"), "llm": ("klip.hcot.llm", "LLMBackend")}


class InconsistentText(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class HCoTResult:
  """The structured text of one chip and how it was reached.

  answers: the validated answer of every level, {level: answer}; repairs: what the consistency
  level changed and why; uncertain / generic: field names marked uncertain / left generic.
  """
  text: text.StructuredText
  answers: dict[str, dict[str, Any]]
  repairs: tuple[str, ...]
  uncertain: tuple[str, ...]
  generic: tuple[str, ...]


def make_backend(name: str, **options) -> backend_lib.Backend:
  """The backend called `name` ("rules" or "llm"), constructed with `options`."""
  if name not in BACKENDS:
    raise ValueError(f"unknown HCoT backend {name!r}, expected one of {sorted(BACKENDS)}")
  module, cls = BACKENDS[name]
  return getattr(importlib.import_module(module), cls)(**options)


def for_backend(name: str, data_dir: str, **llm_options) -> Generator:
  """The generator of backend `name`: "rules", or "llm" with its server options (`model` is
  required; the answer cache defaults to DATA_DIR/.hcot_cache, so a rebuild resumes)."""
  options = {}
  if name == "llm":
    if not llm_options.get("model"):
      raise ValueError("--backend=llm needs --llm_model (the model the server serves)")
    options = dict(llm_options)
    options["cache_dir"] = options.get("cache_dir") or os.path.join(data_dir, ".hcot_cache")
  return Generator(make_backend(name, **options))


class Generator:
  """Runs the five HCoT levels with one backend."""

  def __init__(self, backend: backend_lib.Backend):
    self.backend = backend

  @staticmethod
  def check(chip: chip_lib.Chip, family: str, values) -> list[consistency.Violation]:
    """What the consistency checks find wrong with `values` for `chip` (build reports)."""
    return consistency.check(chip, family, values)

  def generate(self, chip: chip_lib.Chip) -> HCoTResult:
    answers: dict[str, dict[str, Any]] = {}
    for level in backend_lib.LEVELS:
      request = levels.request(level, chip, answers)
      answers[level] = backend_lib.validate(request, self.backend.answer(request))
    final = answers["consistency"]
    st = text.compose(chip.family, [final["values"][n] for n in chip.field_names])
    violations = consistency.check(chip, chip.family, st.values)
    if violations:
      found = "; ".join(f"{v.field}: {v.reason}" for v in violations)
      raise InconsistentText(f"chip {chip.id}, backend {self.backend.name}: the final fields "
                             f"contradict the chip ({found})")
    return HCoTResult(text=st, answers=answers, repairs=tuple(final["repairs"]),
                      uncertain=tuple(final["uncertain"]), generic=tuple(final["generic"]))
