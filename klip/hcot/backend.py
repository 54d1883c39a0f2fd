"""The contract between the HCoT levels and the backends that answer them.

The generator (`klip.hcot.generator`) walks the five levels in order. For each level it builds a
`LevelRequest` holding the facts that level reads (chip metadata, ground truth where known and
knowledge-base lookups, all JSON-serialisable), the answers of the earlier levels, and the JSON
schema the answer must satisfy. A backend answers with a JSON-like dict; the generator validates
it against the schema (`validate`) whatever the backend.

Backends: `rules` (deterministic, offline, the default; `klip.hcot.rules`) and `llm` (an
OpenAI-compatible chat-completions server; `klip.hcot.llm`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

import jsonschema

LEVELS = ("geoscience", "society", "physics", "instances", "consistency")


@dataclasses.dataclass(frozen=True)
class LevelRequest:
  """One level's question about one chip.

  chip_id: the example id (cache keys and error messages name it).
  level: one of LEVELS.
  instructions: what this level must conclude, in plain words (the LLM prompt's task text).
  facts: what the level reads: metadata, ground truth, knowledge-base lookups (JSON types).
  previous: the validated answers of the earlier levels, {level: answer}.
  schema: JSON schema of the answer.
  """
  chip_id: str
  level: str
  instructions: str
  facts: dict[str, Any]
  previous: dict[str, dict[str, Any]]
  schema: dict[str, Any]

  def key(self) -> str:
    """A stable text of everything that determines the answer (for caches)."""
    return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


class Backend(Protocol):
  name: str

  def answer(self, request: LevelRequest) -> dict[str, Any]:
    """The level's answer; must satisfy request.schema."""


class InvalidAnswer(ValueError):
  pass


def validate(request: LevelRequest, answer: Any) -> dict[str, Any]:
  """Returns `answer` if it satisfies the request's schema; raises InvalidAnswer naming the chip,
  the level and what is wrong otherwise."""
  try:
    jsonschema.validate(answer, request.schema)
  except jsonschema.ValidationError as e:
    where = "/".join(map(str, e.absolute_path)) or "(root)"
    raise InvalidAnswer(f"chip {request.chip_id}, level {request.level}: answer field {where}: "
                        f"{e.message}") from e
  return answer
