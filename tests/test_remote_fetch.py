"""The remote image fetch (qwenvl_jax/remote_fetch.py: serve's remote images and the cleaning job's image URLs)
against a local HTTP server thread that answers from a script: some bytes at once, then a drip of one byte every
50 ms (3 s in all, each byte well within any per-read timeout), then the rest."""
import contextlib
import socket
import socketserver
import threading
import time
import urllib.error

import pytest

from qwenvl_jax import remote_fetch as fetch
from qwenvl_jax.cleaning import images
from qwenvl_jax.serving import messages

DRIP_S = 0.05
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"


@contextlib.contextmanager
def scripted_server(answers: dict[str, tuple[bytes, bytes, bytes]]):
  """A server answering GET PATH with `answers[PATH]` = (sent at once, dripped byte by byte, sent last)."""

  class Handler(socketserver.StreamRequestHandler):

    def handle(self):
      path = self.rfile.readline().split()[1].decode()
      while self.rfile.readline() not in (b"\r\n", b""):
        pass
      head, drip, tail = answers[path]
      try:
        self.wfile.write(head)
        for i in range(len(drip)):
          time.sleep(DRIP_S)
          self.wfile.write(drip[i:i + 1])
        self.wfile.write(tail)
        if not tail:  # an answer that never ends: hold the connection until the client leaves
          self.rfile.read()
      except OSError:  # the client gave up
        pass

  server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


SLOW = b"x" * 60  # 60 drips of 50 ms: 3 s, six times the deadline below
ANSWERS = {
    "/slow-headers": (b"HTTP/1.1 200 OK\r\nX-Pad: ", SLOW, b"\r\nContent-Length: 3\r\n\r\nabc"),
    "/slow-body": (b"HTTP/1.1 200 OK\r\nContent-Length: 63\r\n\r\nabc", SLOW, b""),
    # Each hop takes 0.3 s: within a deadline of 0.5 s per connection, urllib would stop at its 5th as a loop.
    "/slow-redirect": (b"HTTP/1.1 302 Found\r\nLocation: /slow-redirect\r\nX-Pad: ", b"x" * 6,
                       b"\r\nContent-Length: 0\r\n\r\n"),
    "/huge": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n", b"", b""),
    "/huge-chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n",
                      b"", b""),
    "/ok": (OK, b"", b""),
    "/moved": (b"HTTP/1.1 301 Moved\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n", b"", b""),
}


@pytest.fixture(scope="module")
def remote():
  with scripted_server(ANSWERS) as url:
    yield url


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body", "/slow-redirect"])
def test_a_server_that_trickles_its_answer_is_cut_at_the_deadline(remote, path):
  """A byte every 50 ms keeps a per-read timeout of 0.5 s waiting for ever (the fetch used to run as long as the
  server dripped, holding a worker thread); one deadline covers the headers, the body and every redirect."""
  with pytest.raises((TimeoutError, urllib.error.URLError), match="timed out"):
    fetch.fetch(remote + path, max_bytes=1000, timeout=0.5)


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
def test_a_reply_over_the_byte_limit_is_refused_without_waiting_for_it(remote, path):
  """A Content-Length over the limit is refused from the header (the fetch used to wait for its body, which never
  comes); a chunked reply is cut one byte past the limit, not read to its end."""
  with pytest.raises(fetch.TooLargeError):
    fetch.fetch(remote + path, max_bytes=1000, timeout=30)


def test_a_reply_within_the_limits_is_read_through_redirects(remote):
  assert fetch.fetch(remote + "/moved", max_bytes=3, timeout=30) == b"abc"


def test_a_slow_or_huge_remote_image_is_a_bad_request(remote):
  """What a client of the API gets: a 400 naming the problem."""
  policy = messages.ImagePolicy(allow_remote=True, remote_timeout=0.5, max_bytes=1000)
  with pytest.raises(messages.RequestError, match="cannot be fetched.*timed out") as err:
    messages.load_image(remote + "/slow-body", policy, 16)
  assert err.value.status == 400 and err.value.code == "invalid_image_url"
  with pytest.raises(messages.RequestError, match="over the limit of 1000 bytes") as err:
    messages.load_image(remote + "/huge", policy, 16)
  assert err.value.status == 400 and err.value.code == "image_too_large"


def test_a_host_name_that_never_resolves_is_cut_at_the_deadline(monkeypatch):
  """`socket.getaddrinfo` has no timeout: a resolver that never answers held the fetch outside its deadline."""
  answered = threading.Event()

  def never_resolves(host, *args, **kwargs):
    answered.wait(60)  # released when the test ends
    raise socket.gaierror(f"{host}: not resolved")
  monkeypatch.setattr(socket, "getaddrinfo", never_resolves)
  try:
    with pytest.raises((TimeoutError, urllib.error.URLError), match="timed out resolving images.example"):
      fetch.fetch("http://images.example/a.png", max_bytes=1000, timeout=0.3)
  finally:
    answered.set()


def test_an_unknown_host_fails_at_once_as_before():
  with pytest.raises(urllib.error.URLError):
    fetch.fetch("http://no-such-host.invalid/a.png", max_bytes=1000, timeout=5)


def test_the_cleaning_job_fetches_within_one_deadline_too(remote):
  """The cleaning job's image URLs were fetched with urllib's per-read timeout: a trickling server held a worker."""
  with pytest.raises(images.ImageReadError, match="cannot fetch .*timed out"):
    images.read_image_bytes(remote + "/slow-body", root="/", max_bytes=1000, timeout_s=0.5)
  with pytest.raises(images.ImageReadError, match="over max_image_bytes=1000"):
    images.read_image_bytes(remote + "/huge", root="/", max_bytes=1000, timeout_s=30)
  assert images.read_image_bytes(remote + "/moved", root="/", max_bytes=1000, timeout_s=30) == b"abc"
