"""The `llm` backend: an OpenAI-compatible chat-completions server answers the HCoT levels.

Any server speaking the OpenAI protocol works (vLLM, llama.cpp server, Ollama): each level is one
POST to `{base_url}/chat/completions` with a system and a user message (`messages`) and
`temperature: 0` and `response_format: json_object`; the answer is the JSON object in
`choices[0].message.content`.

Every answer is parsed (a ```json fenced block is tolerated) and checked with
`backend.validate`; a malformed or schema-invalid answer goes back to the model with the error
appended to the conversation, up to `max_retries` times. HTTP 429, 5xx, timeouts and connection
errors are retried with exponential backoff (jitter seeded by the request, so runs repeat),
honouring `Retry-After`. Requests are spaced at least `1 / max_requests_per_s` apart across all
threads and processes that share `cache_dir`.

Cache: one file `{cache_dir}/{sha256}.json` per validated answer, the hash taken over the model
name and the first-turn prompt messages, written atomically (temporary file + rename). A rerun,
or a batch resumed after an interruption, asks the server only for what is not cached.

The API key is read from the environment variable `api_key_env` at each request and sent as a
Bearer token; it is never stored on the backend, so it cannot reach a pickle, a repr, a log
line, an error message or a cache file.
"""

from __future__ import annotations

import dataclasses
import email.utils
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from klip.hcot import backend

_log = logging.getLogger(__name__)

_SUMMARY_EVERY = 100  # answers between two progress lines in the log
_RATE_FILE = ".rate"  # next free request slot, shared through cache_dir
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)

SYSTEM_PROMPT = (
    "You are an expert analyst of synthetic aperture radar (SAR) image chips. You write one "
    "level of a hierarchical chain of thought about one chip: geoscience, society, SAR "
    "physics, instances, cross-level consistency. Use only the facts given and the earlier "
    "levels' conclusions; where they leave a field open, choose the most general value the "
    "schema allows instead of inventing detail. Reply with a single JSON object that satisfies "
    "the given JSON schema, and nothing else.")


class LLMError(RuntimeError):
  """The server could not produce a valid answer; the message says which chip and what to do."""


@dataclasses.dataclass
class Stats:
  """What the backend did (per process): for the build report."""
  answers: int = 0  # levels answered (from the server or the cache)
  cache_hits: int = 0
  requests: int = 0  # HTTP requests sent
  retries: int = 0  # requests repeated after 429/5xx/timeout/connection errors
  invalid_answers: int = 0  # answers sent back to the model as malformed or schema-invalid
  failures: int = 0  # levels given up on

  def summary(self) -> str:
    return (f"{self.answers} answers ({self.cache_hits} from cache), {self.requests} requests, "
            f"{self.retries} retries, {self.invalid_answers} invalid answers, "
            f"{self.failures} failures")


class _Retryable(Exception):
  """A transient failure of one request; `delay_s` is the server's Retry-After, if any."""

  def __init__(self, what: str, delay_s: float | None = None):
    super().__init__(what)
    self.delay_s = delay_s


def prompt_messages(request: backend.LevelRequest) -> list[dict[str, str]]:
  """The first-turn conversation for one level: the system role and the level's question."""
  order = {level: i for i, level in enumerate(backend.LEVELS)}
  previous = "\n".join(
      f"{level}: {json.dumps(request.previous[level], sort_keys=True, default=str)}"
      for level in sorted(request.previous, key=lambda l: order.get(l, len(order))))
  user = "\n\n".join([
      f"Level: {request.level}",
      f"Task:\n{request.instructions}",
      f"Facts (JSON):\n{json.dumps(request.facts, sort_keys=True, indent=1, default=str)}",
      f"Conclusions of the earlier levels (JSON):\n{previous or 'none: this is the first level.'}",
      f"JSON schema of the answer:\n{json.dumps(request.schema, sort_keys=True)}",
      "Answer with one JSON object that satisfies this schema.",
  ])
  return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
  """sha256 (hex) of the model name and the prompt messages."""
  text = json.dumps({"model": model, "messages": messages}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def parse_answer(request: backend.LevelRequest, content: str | None) -> dict[str, Any]:
  """The model's reply as a validated answer; raises backend.InvalidAnswer."""
  fenced = _FENCE.search(content or "")
  text = fenced.group(1) if fenced else (content or "").strip()
  try:
    answer = json.loads(text)
  except json.JSONDecodeError as e:
    raise backend.InvalidAnswer(f"chip {request.chip_id}, level {request.level}: the answer is "
                                f"not valid JSON ({e})") from e
  if not isinstance(answer, dict):
    raise backend.InvalidAnswer(f"chip {request.chip_id}, level {request.level}: the answer is "
                                f"a JSON {type(answer).__name__}, not an object")
  return backend.validate(request, answer)


def _retry_after_s(value: str | None) -> float | None:
  """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
  except (TypeError, ValueError):
    return None


class LLMBackend:
  """Answers HCoT levels through an OpenAI-compatible chat-completions server."""

  name = "llm"

  def __init__(self, base_url: str, model: str, *, cache_dir: str,
               api_key_env: str = "KLIP_LLM_API_KEY", require_api_key: bool = False,
               timeout_s: float = 60, max_retries: int = 4, backoff_s: float = 1.0,
               max_requests_per_s: float = 5.0):
    if max_requests_per_s <= 0:
      raise ValueError(f"max_requests_per_s must be positive, got {max_requests_per_s}")
    if max_retries < 0:
      raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    self.base_url = base_url.rstrip("/")
    self.model = model
    self.cache_dir = cache_dir
    self.api_key_env = api_key_env
    self.require_api_key = require_api_key
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_requests_per_s = max_requests_per_s
    self.stats = Stats()
    self._lock = threading.Lock()
    self._api_key(None)  # a required key that is missing fails here, before any work
    os.makedirs(cache_dir, exist_ok=True)

  def __repr__(self) -> str:
    return (f"LLMBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"cache_dir={self.cache_dir!r}, api_key_env={self.api_key_env!r})")

  def __getstate__(self) -> dict[str, Any]:
    """Pickled without the lock; the copy starts its own (per-process) stats."""
    state = dict(self.__dict__)
    del state["_lock"]
    state["stats"] = Stats()
    return state

  def __setstate__(self, state: dict[str, Any]):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def answer(self, request: backend.LevelRequest) -> dict[str, Any]:
    """The level's validated answer, from the cache or the server; raises LLMError."""
    messages = prompt_messages(request)
    key = cache_key(self.model, messages)
    answer = self._cache_read(key, request)
    if answer is not None:
      self._count(cache_hits=1)
    else:
      answer = self._ask(request, messages)
      self._cache_write(key, request, answer)
    self._count(answers=1)
    if self.stats.answers % _SUMMARY_EVERY == 0:
      _log.info("llm %s: %s", self.model, self.stats.summary())
    return answer

  def _ask(self, request: backend.LevelRequest, messages: list[dict[str, str]]):
    """Asks until the model gives a valid answer, showing it each rejected one."""
    conversation = list(messages)
    for attempt in range(self.max_retries + 1):
      content = self._complete(request, conversation)
      try:
        return parse_answer(request, content)
      except backend.InvalidAnswer as e:
        error = e
        self._count(invalid_answers=1)
        _log.warning("llm: %s (try %d of %d)", e, attempt + 1, self.max_retries + 1)
        conversation += [
            {"role": "assistant", "content": content or ""},
            {"role": "user", "content": f"That answer was rejected: {e}. Reply again with a "
                                        "single JSON object that satisfies the schema."}]
    self._count(failures=1)
    raise LLMError(
        f"chip {request.chip_id}, level {request.level}: model {self.model!r} at "
        f"{self.base_url} gave no valid answer in {self.max_retries + 1} tries; last: {error}. "
        "Check that the model name is right and that the model can follow JSON instructions "
        "(a larger or instruction-tuned model helps); answers already generated are kept in "
        f"{self.cache_dir}, so a rerun resumes.")

  def _complete(self, request: backend.LevelRequest, messages: list[dict[str, str]]):
    """One chat completion (the reply's content), retrying transient failures."""
    body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                       "response_format": {"type": "json_object"}}).encode()
    jitter = random.Random(f"{request.key()}|{len(messages)}")
    for attempt in range(self.max_retries + 1):
      try:
        return self._post(request, body)
      except _Retryable as e:
        failure = e
      if attempt == self.max_retries:
        break
      delay = failure.delay_s
      if delay is None:
        delay = self.backoff_s * 2**attempt * (1 + 0.5 * jitter.random())
      self._count(retries=1)
      _log.warning("llm: chip %s, level %s: %s; retrying in %.2f s (try %d of %d)",
                   request.chip_id, request.level, failure, delay, attempt + 2,
                   self.max_retries + 1)
      time.sleep(delay)
    self._count(failures=1)
    raise LLMError(
        f"chip {request.chip_id}, level {request.level}: the server at {self.base_url} failed "
        f"{self.max_retries + 1} times (last: {failure}). Check that the server is running at "
        f"that URL (the OpenAI-compatible base, e.g. http://localhost:8000/v1), that it serves "
        f"model {self.model!r}, and the API key in ${self.api_key_env} if it needs one; answers "
        f"already generated are kept in {self.cache_dir}, so a rerun resumes.")

  def _post(self, request: backend.LevelRequest, body: bytes) -> str | None:
    """Sends one request; raises _Retryable for transient failures, LLMError for the rest."""
    headers = {"Content-Type": "application/json"}
    key = self._api_key(request)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    http_request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body,
                                          headers=headers, method="POST")
    self._throttle()
    self._count(requests=1)
    try:
      with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      with e:
        detail = self._redact(e.read(500).decode("utf-8", "replace"), key)
      if e.code == 429 or e.code >= 500:
        raise _Retryable(f"HTTP {e.code} {detail}".strip(),
                         _retry_after_s(e.headers.get("Retry-After"))) from None
      hint = {401: f"check the API key in ${self.api_key_env}",
              403: f"check the API key in ${self.api_key_env}",
              404: f"check the server URL and that it serves model {self.model!r}"}.get(
                  e.code, "check the server URL and model name")
      raise LLMError(f"chip {request.chip_id}, level {request.level}: the server at "
                     f"{self.base_url} answered HTTP {e.code} {detail}; {hint}.") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError,
            http.client.HTTPException) as e:
      reason = getattr(e, "reason", e)
      raise _Retryable(self._redact(f"{type(reason).__name__}: {reason}", key)) from None
    try:
      return json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      start = self._redact(payload[:200].decode("utf-8", "replace"), key)
      raise LLMError(
          f"chip {request.chip_id}, level {request.level}: the server at {self.base_url} did "
          f"not return a chat completion ({start!r}); check the server URL (the "
          "OpenAI-compatible base, e.g. http://localhost:8000/v1).") from None

  def _api_key(self, request: backend.LevelRequest | None) -> str | None:
    key = os.environ.get(self.api_key_env)
    if not key and self.require_api_key:
      where = f"chip {request.chip_id}, level {request.level}: " if request else ""
      raise LLMError(f"{where}the LLM server needs an API key: set the environment variable "
                     f"{self.api_key_env} (or name another one with api_key_env).")
    return key

  @staticmethod
  def _redact(text: str, key: str | None) -> str:
    """`text` with the API key blanked out (servers may echo it in error bodies)."""
    return text.replace(key, "***") if key else text

  def _throttle(self):
    """Waits for the next request slot: 1 / max_requests_per_s apart across the threads and
    processes sharing cache_dir (the slot is reserved under a file lock)."""
    with self._lock, open(os.path.join(self.cache_dir, _RATE_FILE), "a+",
                          encoding="utf-8") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      f.seek(0)
      try:
        reserved = float(f.read())
      except ValueError:  # a new file (or one cut short by a crash)
        reserved = 0.0
      now = time.time()
      slot = max(now, reserved)
      f.seek(0)
      f.truncate()
      f.write(repr(slot + 1 / self.max_requests_per_s))
    time.sleep(max(0.0, slot - now))

  def _count(self, **increments: int):
    with self._lock:
      for name, n in increments.items():
        setattr(self.stats, name, getattr(self.stats, name) + n)

  def _cache_path(self, key: str) -> str:
    return os.path.join(self.cache_dir, f"{key}.json")

  def _cache_read(self, key: str, request: backend.LevelRequest) -> dict[str, Any] | None:
    """The cached answer, or None when absent or no longer valid (then it is asked again)."""
    try:
      with open(self._cache_path(key), encoding="utf-8") as f:
        return backend.validate(request, json.load(f)["answer"])
    except FileNotFoundError:
      return None
    except (ValueError, KeyError, TypeError, backend.InvalidAnswer) as e:
      _log.warning("llm: cache file %s is unusable (%s); asking the server again",
                   self._cache_path(key), e)
      return None

  def _cache_write(self, key: str, request: backend.LevelRequest, answer: dict[str, Any]):
    """Writes the answer atomically: a reader sees the whole file or none."""
    record = {"model": self.model, "level": request.level, "answer": answer}
    fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, sort_keys=True)
      os.replace(tmp, self._cache_path(key))
    except BaseException:
      os.unlink(tmp)
      raise
