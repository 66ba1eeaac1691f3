"""An http(s) GET bounded in time and in bytes: the remote images of `serve --allow_remote_images` and the image
URLs of the cleaning pipeline (`clean`).

urllib's `timeout` bounds each socket operation, not the exchange: a server that sends a byte of its headers or of its
body every few seconds holds the fetch, and the worker thread checking the request, for as long as it likes, and
`socket.getaddrinfo` has no timeout at all. Here one deadline covers the whole exchange, redirects included: resolving
the host name (in a thread the caller stops waiting for at the deadline; the lookup itself ends when the system resolver
gives up), connecting and every read of the status line, the headers and the body are each given the time left. A reply
whose Content-Length is over the byte limit is refused before any of its body is read; one without it is read to one
byte past the limit at most. Only http and https are followed (urllib's default opener would also follow a redirect to
ftp://, with no deadline).
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import threading
import time
import urllib.request


class TooLargeError(Exception):
  """The reply is over the byte limit."""


def fetch(url: str, *, max_bytes: int, timeout: float, headers: dict[str, str] | None = None) -> bytes:
  """The body of an http(s) `url` (sent with `headers`), fetched within `timeout` seconds in all.

  Raises TooLargeError past `max_bytes`; TimeoutError (possibly as a urllib.error.URLError) past the deadline; and
  what urllib raises for a URL that cannot be fetched (URLError / HTTPError, both OSError; ValueError;
  http.client.HTTPException)."""
  deadline = time.monotonic() + timeout
  opener = urllib.request.OpenerDirector()
  for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTPHandler(deadline),
                  _HTTPSHandler(deadline), urllib.request.HTTPDefaultErrorHandler(),
                  urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
    opener.add_handler(handler)
  with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
    length = response.length  # http.client's parsed Content-Length (None without one)
    if length is not None and length > max_bytes:
      raise TooLargeError(f"the reply has {length} bytes")
    data = response.read(max_bytes + 1)
  if len(data) > max_bytes:
    raise TooLargeError(f"the reply has more than {max_bytes} bytes")
  return data


def _time_left(deadline: float) -> float:
  left = deadline - time.monotonic()
  if left <= 0:
    raise TimeoutError("timed out: the whole exchange took longer than its deadline")
  return left


def _resolve(host: str, port: int, deadline: float) -> list:
  """`socket.getaddrinfo(host, port)` for a TCP stream, given up on at `deadline` (TimeoutError)."""
  found: list = []

  def lookup():
    try:
      found.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
    except OSError as e:  # socket.gaierror: no such host
      found.append(e)

  thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
  thread.start()
  thread.join(_time_left(deadline))
  if not found:
    raise TimeoutError(f"timed out resolving {host}: the whole exchange took longer than its deadline")
  if isinstance(found[0], OSError):
    raise found[0]
  return found[0]


def _connect(address: tuple[str, int], deadline: float, source_address=None) -> socket.socket:
  """`socket.create_connection(address)` with its lookup and each connect attempt within `deadline`."""
  host, port = address
  error: OSError | None = None
  for family, kind, proto, _, sockaddr in _resolve(host, port, deadline):
    sock = socket.socket(family, kind, proto)
    try:
      sock.settimeout(_time_left(deadline))
      if source_address:
        sock.bind(source_address)
      sock.connect(sockaddr)
      return sock
    except OSError as e:
      sock.close()
      error = e
      if isinstance(e, TimeoutError):
        break
  raise error if error is not None else OSError(f"no address found for {host}")


class _DeadlineReader(io.RawIOBase):
  """A response's socket reads (`raw`: its `SocketIO`), each allowed only the time left before `deadline`."""

  def __init__(self, raw: io.RawIOBase, sock, deadline: float):
    super().__init__()
    self._raw, self._sock, self._deadline = raw, sock, deadline

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int | None:
    self._sock.settimeout(_time_left(self._deadline))
    return self._raw.readinto(buffer)

  def fileno(self) -> int:
    return self._raw.fileno()

  def close(self) -> None:
    if not self.closed:
      self._raw.close()  # releases the socket (urllib has closed the connection's own reference)
    super().close()


class _Response(http.client.HTTPResponse):
  """An HTTPResponse whose status line, headers and body are all read before `deadline`."""

  def __init__(self, sock, *args, deadline: float, **kwargs):
    super().__init__(sock, *args, **kwargs)
    # Nothing is read yet: the buffer `makefile` made is empty, so its raw SocketIO can be taken out of it.
    self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _HTTPConnection(http.client.HTTPConnection):
  """Connects (and, for https, shakes hands) within the time left; its responses read within it too."""

  def __init__(self, *args, deadline: float, **kwargs):
    super().__init__(*args, **kwargs)
    self._deadline = deadline
    self.response_class = functools.partial(_Response, deadline=deadline)
    # `HTTPConnection.connect` opens its socket with this (host lookup included); https then wraps the socket.
    self._create_connection = lambda address, timeout, source=None: _connect(address, deadline, source)

  def connect(self) -> None:
    # The TLS handshake of `HTTPSConnection.connect` runs under this socket timeout as one deadline too.
    self.timeout = _time_left(self._deadline)
    super().connect()


class _HTTPSConnection(_HTTPConnection, http.client.HTTPSConnection):
  pass


class _HTTPHandler(urllib.request.HTTPHandler):

  def __init__(self, deadline: float):
    super().__init__()
    self._deadline = deadline

  def http_open(self, req):
    return self.do_open(functools.partial(_HTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):

  def __init__(self, deadline: float):
    super().__init__()
    self._deadline = deadline

  def https_open(self, req):
    return self.do_open(functools.partial(_HTTPSConnection, deadline=self._deadline), req, context=self._context)
