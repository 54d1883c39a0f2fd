"""The `llm` HCoT backend against an OpenAI-compatible server started inside each test.

The server (`FakeServer`) records every request it receives and follows a per-test script of
replies (malformed answers, HTTP errors, slow responses); once the script is used up it answers
validly from the request's schema.
"""

import glob
import hashlib
import http.server
import json
import logging
import os
import pickle
import threading
import time
import traceback

import pytest

from klip.hcot import backend
from klip.hcot import llm

SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["ship", "aircraft", "uncertain"]},
        "evidence": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["category", "evidence"],
    "additionalProperties": False,
}
KEY_ENV = "KLIP_TEST_LLM_KEY"
SECRET = "sk-test-0123456789abcdef"


def level_request(i: int = 0) -> backend.LevelRequest:
  return backend.LevelRequest(
      chip_id=f"chip-{i}", level="instances",
      instructions="Name the category whose size range fits the object.",
      facts={"length_m": 100 + i, "band": "C"},
      previous={"physics": {"mechanism": "double bounce"}, "geoscience": {"coast": True}},
      schema=SCHEMA)


def valid_answer(body: dict) -> dict:
  """A schema-valid answer that identifies the prompt it answers."""
  digest = hashlib.sha256(body["messages"][1]["content"].encode()).hexdigest()[:8]
  return {"category": SCHEMA["properties"]["category"]["enum"][0], "evidence": [digest]}


class FakeServer:
  """A chat-completions server on 127.0.0.1 in a thread.

  `script` holds the replies to the next calls, each one of:
    ("content", text): HTTP 200 with `text` as the message content;
    ("status", code, headers, body): that HTTP error;
    ("echo_auth", code): that HTTP error with the Authorization header as body;
    ("sleep", seconds): a valid answer after a delay.
  `calls` records (receipt time, headers, body) of every request.
  """

  def __init__(self):
    self.script = []
    self.calls = []
    self._lock = threading.Lock()
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
    threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

  def stop(self):
    self._httpd.shutdown()
    self._httpd.server_close()

  def _handler(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      """Answers POST /v1/chat/completions from the script."""

      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server._lock:  # pylint: disable=protected-access
          server.calls.append((time.time(), dict(self.headers), body))
          action = server.script.pop(0) if server.script else ("content", None)
        if self.path != "/v1/chat/completions":
          action = ("status", 404, {}, "no such route")
        try:
          self._reply(action, body)
        except OSError:  # the client gave up (timeout test)
          pass

      def _reply(self, action, body):
        if action[0] == "sleep":
          time.sleep(action[1])
          action = ("content", None)
        kind = action[0]
        if kind == "content":
          content = json.dumps(valid_answer(body)) if action[1] is None else action[1]
          self._send(200, {}, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": content}}]}))
        elif kind == "echo_auth":
          self._send(action[1], {}, f"invalid key {self.headers.get('Authorization')}")
        else:
          self._send(*action[1:])

      def _send(self, code, headers, text):
        data = text.encode()
        self.send_response(code)
        for name, value in {"Content-Type": "application/json", **headers}.items():
          self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):  # pylint: disable=arguments-differ
        pass

    return Handler


@pytest.fixture
def serve():
  """Starts fake servers on demand; stops them all at the end of the test."""
  servers = []

  def start():
    servers.append(FakeServer())
    return servers[-1]

  yield start
  for s in servers:
    s.stop()


@pytest.fixture
def server(serve):
  return serve()


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)


def make_backend(url, cache_dir, **options):
  options = {"api_key_env": KEY_ENV, "timeout_s": 5, "max_retries": 2, "backoff_s": 0.01,
             "max_requests_per_s": 1000, **options}
  return llm.LLMBackend(url, "test-model", cache_dir=str(cache_dir), **options)


def test_valid_answer_and_prompt(server, tmp_path):
  b = make_backend(server.url, tmp_path)
  req = level_request()
  answer = b.answer(req)
  (_, headers, body), = server.calls
  assert answer == valid_answer(body)
  assert body["model"] == "test-model" and body["temperature"] == 0
  assert body["response_format"] == {"type": "json_object"}
  system, user = body["messages"]
  assert system["role"] == "system" and "single JSON object" in system["content"]
  assert user["role"] == "user"
  assert req.instructions in user["content"] and '"length_m": 100' in user["content"]
  assert 'geoscience: {"coast": true}\nphysics: {"mechanism": "double bounce"}' in user["content"]
  assert json.dumps(SCHEMA, sort_keys=True) in user["content"]
  assert "Authorization" not in headers  # no key in the environment, none required
  assert (b.stats.requests, b.stats.answers, b.stats.cache_hits) == (1, 1, 0)


def test_fenced_answer_is_accepted(server, tmp_path):
  server.script = [("content", '```json\n{"category": "aircraft", "evidence": []}\n```')]
  assert make_backend(server.url, tmp_path).answer(level_request()) == {
      "category": "aircraft", "evidence": []}
  assert len(server.calls) == 1


@pytest.mark.parametrize("bad, error", [
    ('{"category": "ship", "evidence": [', "not valid JSON"),
    ('{"category": "submarine", "evidence": []}', "answer field category: 'submarine'"),
    ('["ship"]', "not an object"),
])
def test_invalid_answer_is_corrected(server, tmp_path, bad, error):
  server.script = [("content", bad)]
  b = make_backend(server.url, tmp_path)
  answer = b.answer(level_request())
  assert len(server.calls) == 2
  body = server.calls[1][2]
  assert answer == valid_answer(body)
  first, second = server.calls[0][2]["messages"], body["messages"]
  assert second[:2] == first
  assert second[2] == {"role": "assistant", "content": bad}
  assert second[3]["role"] == "user" and error in second[3]["content"]
  assert (b.stats.invalid_answers, b.stats.requests) == (1, 2)


def test_always_invalid_answer_fails_clearly(server, tmp_path):
  server.script = [("content", "I think it is a ship.")] * 3
  b = make_backend(server.url, tmp_path)
  with pytest.raises(llm.LLMError) as e:
    b.answer(level_request(7))
  message = str(e.value)
  assert "chip chip-7, level instances" in message and "no valid answer in 3 tries" in message
  assert "model name" in message and "not valid JSON" in message
  assert b.stats.failures == 1 and not glob.glob(str(tmp_path / "*.json"))


def test_429_honours_retry_after(server, tmp_path):
  server.script = [("status", 429, {"Retry-After": "1"}, '{"error": "rate limited"}')]
  b = make_backend(server.url, tmp_path)
  b.answer(level_request())
  (t0, _, _), (t1, _, _) = server.calls
  assert t1 - t0 >= 0.95  # the server's second, not the 0.01 s backoff
  assert b.stats.retries == 1


def test_timeout_is_retried(server, tmp_path):
  server.script = [("sleep", 1.0)]
  b = make_backend(server.url, tmp_path, timeout_s=0.3)
  answer = b.answer(level_request())
  assert len(server.calls) == 2 and answer == valid_answer(server.calls[1][2])
  assert b.stats.retries == 1


def test_permanent_500_names_chip_and_level(server, tmp_path):
  server.script = [("status", 500, {}, "internal error")] * 3
  b = make_backend(server.url, tmp_path)
  with pytest.raises(llm.LLMError) as e:
    b.answer(level_request(3))
  message = str(e.value)
  assert "chip chip-3, level instances" in message and "HTTP 500" in message
  assert f"server at {server.url} failed 3 times" in message
  assert "'test-model'" in message and KEY_ENV in message
  assert len(server.calls) == 3
  assert (b.stats.retries, b.stats.failures) == (2, 1)


def test_401_is_not_retried_and_names_key_variable(server, tmp_path):
  server.script = [("status", 401, {}, '{"error": "unauthorized"}')]
  with pytest.raises(llm.LLMError, match=f"HTTP 401.*check the API key in \\${KEY_ENV}"):
    make_backend(server.url, tmp_path).answer(level_request())
  assert len(server.calls) == 1


def test_missing_required_key_names_variable(server, tmp_path, monkeypatch):
  with pytest.raises(llm.LLMError, match=f"set the environment variable {KEY_ENV}"):
    make_backend(server.url, tmp_path, require_api_key=True)
  monkeypatch.setenv(KEY_ENV, SECRET)
  b = make_backend(server.url, tmp_path, require_api_key=True)
  monkeypatch.delenv(KEY_ENV)  # e.g. a worker started without it
  with pytest.raises(llm.LLMError, match=f"chip chip-0, level instances: .* {KEY_ENV}"):
    b.answer(level_request())
  assert not server.calls


def test_api_key_is_sent_but_never_leaked(server, tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.DEBUG)
  monkeypatch.setenv(KEY_ENV, SECRET)
  server.script = [("echo_auth", 503)] * 3 + [("echo_auth", 400)]
  b = make_backend(server.url, tmp_path, require_api_key=True)
  errors = []
  for i in range(2):
    with pytest.raises(llm.LLMError) as e:
      b.answer(level_request(i))
    errors.append("".join(traceback.format_exception(e.value)))
  b.answer(level_request(2))
  assert {c[1]["Authorization"] for c in server.calls} == {f"Bearer {SECRET}"}
  assert "invalid key Bearer ***" in errors[0] and "invalid key Bearer ***" in errors[1]
  cache_text = "".join(open(p, encoding="utf-8").read() for p in glob.glob(str(tmp_path / "*")))
  for text in errors + [caplog.text, cache_text, repr(b)]:
    assert SECRET not in text
  assert SECRET.encode() not in pickle.dumps(b)


def test_second_run_is_served_from_cache(server, tmp_path):
  requests = [level_request(i) for i in range(3)]
  first = [make_backend(server.url, tmp_path).answer(r) for r in requests]
  assert len(server.calls) == 3
  b = make_backend(server.url, tmp_path)
  assert [b.answer(r) for r in requests] == first
  assert len(server.calls) == 3
  assert (b.stats.requests, b.stats.cache_hits, b.stats.answers) == (0, 3, 3)
  files = sorted(glob.glob(str(tmp_path / "*.json")))
  assert len(files) == 3 and all(len(os.path.basename(f)) == 64 + 5 for f in files)
  with open(files[0], encoding="utf-8") as f:
    assert set(json.load(f)) == {"model", "level", "answer"}


def test_interrupted_batch_resumes(serve, tmp_path):
  first_server = serve()
  requests = [level_request(i) for i in range(5)]
  b = make_backend(first_server.url, tmp_path)
  with pytest.raises(llm.LLMError, match="chip chip-3, level instances: .*server is running"):
    for i, r in enumerate(requests):
      if i == 3:
        first_server.stop()  # the server dies mid-batch
      b.answer(r)
  assert len(first_server.calls) == 3
  second_server = serve()
  b = make_backend(second_server.url, tmp_path)
  answers = [b.answer(r) for r in requests]
  assert len(second_server.calls) == 2
  assert (b.stats.cache_hits, b.stats.requests) == (3, 2)
  assert answers[4] == valid_answer(second_server.calls[1][2])


def test_rate_limit_holds_across_threads_and_instances(server, tmp_path):
  backends = [make_backend(server.url, tmp_path, max_requests_per_s=10) for _ in range(2)]
  threads = [threading.Thread(target=lambda i=i: [backends[i % 2].answer(level_request(3 * i + j))
                                                  for j in range(2)])
             for i in range(3)]
  start = time.time()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  times = sorted(t for t, _, _ in server.calls)
  assert len(times) == 6
  # Slots are 0.1 s apart from no earlier than `start`, and a receipt can only lag its slot
  # (under load one lagged 0.14 s, arriving 5 ms before the next), never precede it: so the
  # k-th receipt comes at least k slots after the start. Unthrottled, all six would arrive
  # within milliseconds of it.
  assert all(t >= start + k * 0.1 - 1e-3 for k, t in enumerate(times)), (start, times)


def test_backend_pickles(server, tmp_path):
  b = make_backend(server.url, tmp_path)
  b.answer(level_request(0))
  copy = pickle.loads(pickle.dumps(b))
  assert repr(copy) == repr(b) and copy.stats == llm.Stats()
  assert copy.answer(level_request(1)) == valid_answer(server.calls[1][2])
  assert copy.answer(level_request(0)) == b.answer(level_request(0))
  assert copy.stats.cache_hits == 1
