"""The connection's deadlines (serving/connection.py) over real sockets: a request head must be whole within
header_timeout, and a closed connection whose bytes stay unread is reset after close_timeout. uvicorn has neither:
before, a client that opened a socket and sent nothing, or sent its headers a byte at a time, held that socket for
ever, and so did a client that kept a closed connection and never read it."""
import asyncio
import json
import select
import socket
import time

import pytest
import requests

from qwenvl_jax.serving import api, connection, limits
from tests.serving.conftest import (MODEL_NAME, Server, client_reading_nothing, read_until_closed,
                                    wait_until)

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def _hello(scope, receive, send):
  """A bare ASGI app: "ok" after its body, and `?S` seconds later when asked; /early answers without reading it."""
  if scope["type"] != "http":
    return
  if scope["path"] != "/early":
    while (await receive()).get("more_body"):
      pass
  if scope["query_string"]:
    await asyncio.sleep(float(scope["query_string"].decode()))
  await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
  await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def hello():
  conns = connection.ConnectionLimits(header_timeout=0.5, close_timeout=0.3)
  srv = Server(_hello, connections=conns)
  yield srv, conns
  srv.stop()


def _read_response(s: socket.socket) -> bytes:
  """One whole answer with a Content-Length (uvicorn sends its head and body in separate writes)."""
  s.settimeout(10)
  data = b""
  while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
      data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
    chunk = s.recv(65536)
    assert chunk, data
    data += chunk
  return data


def _read_all(s: socket.socket) -> bytes:
  return read_until_closed(s, timeout=10)  # a server without the deadline never closes: a timeout, a failure


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


def test_the_deadline_is_the_heads_alone_and_starts_again_after_each_answer():
  """A head that is whole in time is served however long its body and its answer take; after the answer the
  deadline runs again for the next head on the kept-alive connection (uvicorn's 5 s keep-alive stops only a
  connection that sends nothing)."""
  conns = connection.ConnectionLimits(header_timeout=1.0, close_timeout=0.3)
  srv = Server(_hello, connections=conns)
  try:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
      s.sendall(b"POST /?0.5 HTTP/1.1\r\n")
      time.sleep(0.2)
      s.sendall(b"Host: x\r\nContent-Length: 4\r\n\r\n")  # the head is whole after ~0.2 s
      for byte in b"body":  # a body over 1.2 s, then an answer 0.5 s later: 0.7 s past the head's deadline
        s.sendall(bytes([byte]))
        time.sleep(0.3)
      first = _read_response(s)
      asked = time.monotonic()  # the deadline starts after this (at the answer's end): the bound from below
      s.sendall(HEAD)  # the same connection
      second = _read_response(s)
      answered = time.monotonic()  # ... and before this: the bound from above
      s.sendall(b"GET / HTTP/1.1\r\n")  # part of a third head, never finished
      third = _read_all(s)
      ended = time.monotonic()
  finally:
    srv.stop()
  assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"ok"), first
  assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"ok"), second
  assert third.startswith(b"HTTP/1.1 408 ") and ended - asked >= 0.9 and ended - answered < 4, (third, asked,
                                                                                              answered, ended)
  assert conns.stats() == {"refused_header_timeout": 1}


def test_the_rest_of_a_body_the_app_did_not_read_is_bounded_too():
  """An app may answer before it reads the body (a 404 to a POST): the rest of the body kept arriving on the
  kept-alive connection, a byte at a time, with no deadline at all (uvicorn's keep-alive timer is stopped by each
  read). Now the head deadline, which starts again at the answer's end, closes it."""
  conns = connection.ConnectionLimits(header_timeout=1.0, close_timeout=0.3)
  srv = Server(_hello, connections=conns)
  try:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
      asked = time.monotonic()  # the deadline starts after this, at the answer's end, and before `answered`
      s.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
      answer = _read_response(s)
      answered = time.monotonic()
      try:
        for _ in range(100):  # 10 s of body, a byte every 0.1 s
          s.sendall(b"x")
          time.sleep(0.1)
          if select.select([s], [], [], 0)[0]:
            break
      except (BrokenPipeError, ConnectionResetError):
        pass
      ended = time.monotonic()
  finally:
    srv.stop()
  assert answer.startswith(b"HTTP/1.1 200 ") and ended - asked >= 0.9 and ended - answered < 4, (asked, answered,
                                                                                                  ended)
  assert conns.stats() == {"closed_header_timeout": 1}


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
  srv = Server(api.create_app(engine, serve_tok, api.ServerConfig(model_name=MODEL_NAME, header_timeout=1.0)))
  try:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
      s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
      assert _read_all(s).startswith(b"HTTP/1.1 408 ")
    health = requests.get(srv.url + "/health", timeout=10).json()
  finally:
    srv.stop()
  assert health["refused_header_timeout"] == 1 and health["ready"], health
