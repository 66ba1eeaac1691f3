"""The server's request limits (serving/limits.py) over real HTTP: one server with small limits on the session's
engine (a 20,000-byte body, a 0.5 s body stall, one request waiting beyond the 4 decode slots), driven through raw
sockets where a client misbehaves (a body it never sends, a chunked body that does not end)."""
import asyncio
import concurrent.futures
import json
import logging
import socket
import threading
import time

import openai
import pytest
import requests

from qwenvl_jax.serving import api, limits, messages
from tests.serving.conftest import (MODEL_NAME, Server, client_reading_nothing, read_until_closed,
                                    wait_until)

pytestmark = pytest.mark.slow  # the session's engine warm-up (shared with test_api.py)

MAX_BYTES = 20_000
MAX_WAITING = 1
# ignore_eos: no answer ends at its first token (sampled by the prefill), so each one needs a decode call.
HI = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
      "ignore_eos": True}


@pytest.fixture(scope="module")
def limited(engine, serve_tok):
  config = api.ServerConfig(model_name=MODEL_NAME, max_request_bytes=MAX_BYTES, body_timeout=0.5,
                            max_waiting=MAX_WAITING)
  srv = Server(api.create_app(engine, serve_tok, config))
  yield srv
  srv.stop()


def _health(srv) -> dict:
  return requests.get(srv.url + "/health", timeout=10).json()


def _wait_for_health(srv, key, value) -> dict:
  deadline = time.monotonic() + 60
  while (stats := _health(srv)).get(key) != value and time.monotonic() < deadline:
    time.sleep(0.02)
  return stats


def _answer(s: socket.socket) -> tuple[bytes, dict, dict]:
  """(status line, headers, JSON body) of the server's answer on `s`, read until the server closes it."""
  head, _, body = read_until_closed(s).partition(b"\r\n\r\n")
  status, *lines = head.split(b"\r\n")
  headers = dict(line.decode().lower().split(": ", 1) for line in lines)
  return status, headers, json.loads(body)


def _is_openai_error(body: dict) -> bool:
  return set(body.get("error", {})) == {"message", "type", "param", "code"} and bool(body["error"]["message"])


def _post_head(port: int, headers: str) -> socket.socket:
  s = socket.create_connection(("127.0.0.1", port))
  s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
            .encode())
  return s


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(limited):
  """A 10 GB Content-Length is answered 413 from the header alone: no `100 Continue`, no byte of the body read
  (the server used to wait for the whole body, and would have read all 10 GB into memory)."""
  with _post_head(limited.port, "Content-Length: 10000000000\r\nExpect: 100-continue\r\n") as s:
    status, headers, body = _answer(s)
  assert status.startswith(b"HTTP/1.1 413 ") and headers["connection"] == "close"
  assert _is_openai_error(body) and body["error"]["code"] == "request_too_large", body
  assert str(MAX_BYTES) in body["error"]["message"]


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(limited):
  """Without a Content-Length the body is counted as it arrives: 413 once it passes the limit, while the client
  has not ended it (the server used to wait for its end however long it grew)."""
  before = _health(limited).get("refused_too_large", 0)
  with _post_head(limited.port, "Transfer-Encoding: chunked\r\n") as s:
    chunk = b"x" * 7_000
    for _ in range(MAX_BYTES // len(chunk) + 1):
      s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    status, headers, body = _answer(s)  # the last chunk (0) was never sent
  assert status.startswith(b"HTTP/1.1 413 ") and headers["connection"] == "close"
  assert _is_openai_error(body) and body["error"]["code"] == "request_too_large", body
  assert _health(limited)["refused_too_large"] == before + 1


def test_a_stalled_body_is_answered_408_and_its_place_freed(limited):
  """A client that sends its headers and part of its body, then nothing, is answered 408 after --body_timeout
  (the request used to be held forever, and with it a place among the requests the server holds)."""
  with _post_head(limited.port, "Content-Length: 100\r\n") as s:
    s.sendall(b'{"messages": ')
    status, headers, body = _answer(s)
  assert status.startswith(b"HTTP/1.1 408 ") and headers["connection"] == "close"
  assert _is_openai_error(body) and body["error"]["code"] == "request_timeout", body
  assert _wait_for_health(limited, "open_requests", 0)["open_requests"] == 0


def test_requests_past_the_slots_and_the_waiting_room_get_429_with_retry_after(limited, engine, monkeypatch):
  """With the engine held inside a decode call, 4 slots + 1 waiting place fill up; the next request is answered
  429 at once (OpenAI's overload error, Retry-After) instead of queueing without bound, /health shows the count,
  and once the engine goes on every held request is answered and the places are free again."""
  gate = threading.Event()
  decode = engine.slots.decode

  def held_decode(*args, **kwargs):
    gate.wait(120)
    return decode(*args, **kwargs)

  monkeypatch.setattr(engine.slots, "decode", held_decode)
  full = engine.num_slots + MAX_WAITING
  with concurrent.futures.ThreadPoolExecutor(full) as pool:
    try:
      held = [pool.submit(requests.post, limited.url + "/v1/chat/completions", json=HI, timeout=120)
              for _ in range(full)]
      stats = _wait_for_health(limited, "open_requests", full)
      assert stats["open_requests"] == stats["max_open_requests"] == full, stats
      r = requests.post(limited.url + "/v1/chat/completions", json=HI, timeout=60)
      assert r.status_code == 429 and r.headers["retry-after"] == "1", (r.status_code, r.text)
      assert _is_openai_error(r.json()) and r.json()["error"]["type"] == "server_error", r.text
      client = openai.OpenAI(base_url=limited.url + "/v1", api_key="unused", max_retries=0, timeout=60)
      with pytest.raises(openai.RateLimitError):  # what an OpenAI client makes of it (it retries it by default)
        client.chat.completions.create(model=MODEL_NAME, messages=HI["messages"], max_tokens=2)
      assert _health(limited)["refused_busy"] >= 2
    finally:
      gate.set()
    assert [f.result().status_code for f in held] == [200] * full
  assert _wait_for_health(limited, "open_requests", 0)["open_requests"] == 0
  assert requests.post(limited.url + "/v1/chat/completions", json=HI, timeout=60).status_code == 200


def test_without_the_api_key_a_full_server_answers_401_not_429(engine, serve_tok):
  """With --api_key, a request without the key (or with a wrong one) is refused 401 before any limit is applied:
  it used to get 429 while the server was full (learning its load from a server it may not use), or 413 for a
  body over the limit. With the key, the same request gets 429."""
  srv = Server(api.create_app(engine, serve_tok, api.ServerConfig(model_name=MODEL_NAME, api_key="k3y",
                                                                  max_waiting=0, max_request_bytes=MAX_BYTES)))
  held = []
  try:
    for _ in range(engine.num_slots):  # requests still sending their bodies hold every place
      held.append(_post_head(srv.port, "Authorization: Bearer k3y\r\nContent-Length: 100\r\n"))
      held[-1].sendall(b"{")
    assert _wait_for_health(srv, "open_requests", engine.num_slots)["open_requests"] == engine.num_slots
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Content-Length": str(MAX_BYTES + 1)}):
      # Headers only: the answer comes before the body (body bytes the server never reads would make its close a
      # reset, which can drop the answer before the client reads it).
      with _post_head(srv.port, "".join(f"{k}: {v}\r\n" for k, v in {"Content-Length": "2", **headers}.items())) as s:
        status, _, body = _answer(s)
      assert status.startswith(b"HTTP/1.1 401 ") and body["error"]["code"] == "invalid_api_key", (headers, body)
    r = requests.post(srv.url + "/v1/chat/completions", json=HI, headers={"Authorization": "Bearer k3y"}, timeout=60)
    assert r.status_code == 429, r.text
  finally:
    for s in held:
      s.close()
    srv.stop()


def test_a_client_that_reads_nothing_has_its_answer_cut_and_its_place_freed():
  """uvicorn's send waits while a client reads nothing and the socket's buffers are full: an endless answer to a
  client that stopped reading held its place (and, for a completion, its decode slot) for ever. After send_timeout
  the app's send raises (the app stops), the request stops counting, and the answer ends, with no error logged,
  once the client reads what was buffered."""
  cut = limits.RequestLimits(max_open=1, max_body_bytes=100, body_timeout=60, send_timeout=1.0,
                             counted_paths=("/stream",))
  raised = []

  async def endless(scope, receive, send):  # a bare ASGI app: 64 KiB chunks for ever
    if scope["type"] != "http":
      return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    try:
      while True:
        await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
    except Exception as e:
      raised.append(e)
      raise

  errors = []
  handler = logging.Handler(logging.ERROR)
  handler.emit = errors.append
  logging.getLogger("uvicorn.error").addHandler(handler)
  srv = Server(cut.middleware(endless))
  try:
    request = b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with client_reading_nothing(srv.port, request) as s:
      wait_until(lambda: cut.stats().get("cancelled_send_timeout"))
      assert cut.stats()["cancelled_send_timeout"] == 1 and cut.stats()["open_requests"] == 0, cut.stats()
      assert len(raised) == 1
      data = read_until_closed(s)  # the client reads again: the answer ends and the server closes
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n0\r\n\r\n")
  finally:
    srv.stop()
    logging.getLogger("uvicorn.error").removeHandler(handler)
  assert not errors, [r.getMessage() for r in errors]


def test_an_answer_cut_before_it_started_is_a_bare_408():
  """When even the status line waits (the client has not read an earlier answer on its keep-alive connection), the
  cut answer is a 408 with no body, so the server's protocol state stays valid."""
  cut = limits.RequestLimits(max_open=1, max_body_bytes=100, body_timeout=60, send_timeout=0.1)

  async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})

  sent = []

  async def send(message):
    sent.append(message)
    if len(sent) == 1:
      await asyncio.Event().wait()  # the socket's buffers are full

  async def receive():
    return {"type": "http.disconnect"}

  asyncio.run(cut.middleware(app)({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send))
  assert [m.get("status") for m in sent] == [200, 408, None] and sent[-1]["more_body"] is False
  assert cut.stats()["cancelled_send_timeout"] == 1


def test_the_default_body_limit_takes_the_most_images_of_the_largest_size():
  """Without --max_request_bytes, a request with --max_images data: URLs as long as the image limit lets through
  and 500,000 characters of text fits the body limit."""
  policy = messages.ImagePolicy(max_bytes=200_000)
  url = "data:image/png;base64," + "A" * policy.max_base64_chars  # the longest `_read_url` accepts
  content = [{"type": "image_url", "image_url": {"url": url, "detail": "auto"}}] * 3
  content.append({"type": "text", "text": "x" * 500_000})
  body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": content}]}).encode()
  assert len(body) <= limits.default_max_body_bytes(3, policy)


@pytest.mark.parametrize("headers,sends_after_cut", [
    ([(b"content-length", b"1000000")], 0),  # a JSON answer cannot be ended early: closed at once
    ([], 1),  # a stream: its end is offered once more, for another send_timeout, then the connection is closed
])
def test_a_client_that_never_reads_again_has_its_connection_closed(headers, sends_after_cut):
  """The end of a cut answer waited for the client without a limit: a client that kept its connection and never
  read held that coroutine for ever; and an answer with a Content-Length got an empty last part, which h11 refuses
  ('Too little data for declared Content-Length') with a traceback."""
  cut = limits.RequestLimits(max_open=1, max_body_bytes=100, body_timeout=60, send_timeout=0.1)

  async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    while True:
      await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})

  sent = []

  async def send(message):
    sent.append(message)
    if len(sent) > 1:
      await asyncio.Event().wait()  # the socket's buffers are full and stay full

  async def receive():
    return {"type": "http.disconnect"}

  asyncio.run(asyncio.wait_for(
      cut.middleware(app)({"type": "http", "method": "POST", "path": "/", "headers": []}, receive, send), 30))
  assert len(sent) == 2 + sends_after_cut
  assert cut.stats()["cancelled_send_timeout"] == 1 and cut.stats()["closed_send_timeout"] == 1
