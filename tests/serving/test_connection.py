"""The connection's deadlines (serving/connection.py) over real sockets: a request head must be whole within
header_timeout, and a closed connection whose bytes stay unread is reset after close_timeout. uvicorn has neither:
before, a client that opened a socket and sent nothing, or sent its headers a byte at a time, held that socket for
ever, and so did a client that kept a closed connection and never read it."""
import json
import select
import socket
import time

import pytest
import requests

from qwenvl_jax.serving import api, connection, limits
from tests.serving.conftest import MODEL_NAME, Server, client_reading_nothing, wait_until

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def _hello(scope, receive, send):  # a bare ASGI app: "ok", after `?sleep` seconds when asked
  if scope["type"] != "http":
    return
  if scope["query_string"]:
    import asyncio  # pylint: disable=import-outside-toplevel
    await asyncio.sleep(float(scope["query_string"].decode()))
  while (await receive()).get("more_body"):
    pass
  await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
  await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def hello():
  conns = connection.ConnectionLimits(header_timeout=0.5, close_timeout=0.3)
  srv = Server(_hello, connections=conns)
  yield srv, conns
  srv.stop()


def _read_all(s: socket.socket) -> bytes:
  s.settimeout(10)  # a server without the deadline never answers: this read times out and the test fails
  data = b""
  while chunk := s.recv(65536):
    data += chunk
  return data


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(hello):
  srv, conns = hello
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", srv.port)) as s:
    assert _read_all(s) == b""
  assert 0.45 <= time.monotonic() - start < 5
  assert conns.stats() == {"closed_header_timeout": 1}


def test_a_head_sent_a_byte_at_a_time_gets_408_at_the_deadline(hello):
  """Every byte comes within 0.05 s of the last, so only a deadline on the whole head (not on each read) ends it;
  the answer is OpenAI's error shape, and the connection is closed."""
  srv, conns = hello
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", srv.port)) as s:
    trickle = iter(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 100)
    while not select.select([s], [], [], 0.05)[0]:
      s.send(bytes([next(trickle)]))
    elapsed = time.monotonic() - start
    head, _, body = _read_all(s).partition(b"\r\n\r\n")
  assert 0.45 <= elapsed < 5
  assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
  error = json.loads(body)["error"]
  assert error["code"] == "request_timeout" and "0.5 s" in error["message"], error
  assert conns.stats() == {"refused_header_timeout": 1}


def test_the_deadline_is_the_heads_alone(hello):
  """A head that is whole in time is served however long its body and its answer take, and a kept-alive
  connection gets the deadline again for its next head."""
  srv, conns = hello
  with socket.create_connection(("127.0.0.1", srv.port)) as s:
    for part in (b"POST /?0.8 HTTP/1.1\r\n", b"Host: x\r\nContent-Length: 4\r\n\r\n"):  # 0.3 s for the head
      s.sendall(part)
      time.sleep(0.15)
    for byte in b"body":  # a body over 0.8 s, then an answer 0.8 s later: 1.6 s past the head's deadline
      s.sendall(bytes([byte]))
      time.sleep(0.2)
    s.settimeout(10)
    first = s.recv(65536)
    s.sendall(HEAD)  # the same connection, within uvicorn's 5 s keep-alive
    second = s.recv(65536)
  assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"ok"), first
  assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"ok"), second
  assert conns.stats() == {}


def test_a_closed_connection_whose_bytes_stay_unread_is_reset():
  """An endless answer to a client that reads nothing: limits' send_timeout cuts it and closes the connection
  with bytes still buffered. asyncio's close held the socket until they were read, for ever; now the connection
  is reset close_timeout later, and the client's next read says so."""
  cut = limits.RequestLimits(max_open=1, max_body_bytes=100, body_timeout=60, send_timeout=0.2)

  async def endless(scope, receive, send):
    if scope["type"] != "http":
      return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    while True:
      await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})

  conns = connection.ConnectionLimits(header_timeout=60, close_timeout=0.3)
  srv = Server(cut.middleware(endless), connections=conns)
  try:
    with client_reading_nothing(srv.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n") as s:
      wait_until(lambda: conns.stats().get("reset_unread"), timeout=30)
      assert cut.stats()["closed_send_timeout"] == 1 and conns.stats() == {"reset_unread": 1}, conns.stats()
      with pytest.raises(ConnectionResetError):
        _read_all(s)
  finally:
    srv.stop()


def test_a_closed_connection_that_is_read_is_not_reset(hello):
  srv, conns = hello
  with socket.create_connection(("127.0.0.1", srv.port)) as s:
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_all(s).endswith(b"ok")
  time.sleep(0.5)
  assert conns.stats() == {}


def test_limits_must_be_positive():
  with pytest.raises(ValueError, match="header_timeout > 0"):
    connection.ConnectionLimits(header_timeout=0)


@pytest.mark.slow  # the session's engine warm-up (shared with test_api.py)
def test_the_servers_config_sets_the_deadline_and_health_counts_it(engine, serve_tok):
  srv = Server(api.create_app(engine, serve_tok, api.ServerConfig(model_name=MODEL_NAME, header_timeout=0.3)))
  try:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
      s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
      assert _read_all(s).startswith(b"HTTP/1.1 408 ")
    health = requests.get(srv.url + "/health", timeout=10).json()
  finally:
    srv.stop()
  assert health["refused_header_timeout"] == 1 and health["ready"], health
