"""The HTTP connection's own deadlines, which uvicorn (0.55, with h11) does not have: a uvicorn protocol class,
`ConnectionLimits.protocol`, given to `uvicorn.Config(http=...)` by `api.uvicorn_config`.

  * Request head: a connection must deliver a whole request head (request line and headers) within
    `header_timeout` seconds of opening, or of the end of the previous answer on a kept-alive connection (nginx's
    `client_header_timeout`, 60 s; here the whole head, not each read, so a client that sends one byte at a time
    cannot stretch it). A partial head is answered 408 in OpenAI's error shape and the connection is closed; a
    connection that sent nothing at all is closed without an answer (a browser may open one ahead of a request it
    never makes). Before, a client that trickled its headers, or opened a socket and sent nothing, held that
    socket, and uvicorn's graceful shutdown, for ever. The deadline also bounds the rest of a body that the app
    answered without reading (a 404 to a POST): it is read while the deadline runs, then the connection is closed.
    (A kept-alive connection that sends nothing more, even with part of a next head already sent, is closed
    earlier and quietly by uvicorn's own `timeout_keep_alive`, 5 s.) The 408 is followed by a half close and a
    second of reading before the close, so that bytes the client was still sending do not reset the connection
    before it has read the answer.
  * Close: asyncio's `transport.close()` lets go of a socket only once its buffered bytes are read, so a client
    that keeps its connection and never reads held a closed socket for ever (an answer cut by `limits`'
    `send_timeout`, or any close with bytes still buffered). A connection still unflushed `close_timeout` seconds
    after its close is reset (aborted; nginx's `reset_timedout_connection`).

The counts (`stats`: `closed_header_timeout`, `refused_header_timeout`, `reset_unread`) are shown on `/health`.
Why a subclass of uvicorn's `H11Protocol`: neither uvicorn, Starlette nor FastAPI has a hook for either deadline
(an ASGI app first hears of a request once its head has arrived, and never sees the socket). It overrides only the
connection's start, its reads and the end of each answer, and hands the request cycles a transport whose `close`
arms the reset; h11 is uvicorn's pure-Python protocol, used even where httptools is installed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import struct

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwenvl_jax.serving import messages as msg


LINGER_S = 1.0  # how long a connection answered 408 is still read (and dropped) before it is closed


class _ResettingTransport:
  """`transport` whose `close()` also resets it if its buffered bytes are still unread `seconds` later; every
  other attribute is the transport's."""

  def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, seconds: float, on_reset):
    self._transport, self._loop, self._seconds, self._on_reset = transport, loop, seconds, on_reset
    self._timer: asyncio.TimerHandle | None = None
    self._ended = False
    # What uvicorn calls for every chunk of an answer, bound once (no `__getattr__` on the hot path).
    self.write, self.is_closing = transport.write, transport.is_closing

  def __getattr__(self, name):
    return getattr(self._transport, name)

  def close(self) -> None:
    self._transport.close()
    if not self._ended and self._timer is None and self._transport.get_write_buffer_size():
      self._timer = self._loop.call_later(self._seconds, self._reset)

  def _reset(self) -> None:
    self._timer = None
    if self._ended or not self._transport.get_write_buffer_size():
      return
    self._on_reset()
    # A reset, not a close: closing the socket with bytes still unsent would leave them to the kernel, which keeps
    # the connection (orphaned) while it retries them. SO_LINGER 0 makes the close send an RST at once.
    sock = self._transport.get_extra_info("socket")
    try:
      if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # the socket is already gone: the abort below is all there is to do
      pass
    self._transport.abort()

  def lost(self) -> None:
    """The connection has ended (flushed or reset): no reset is due."""
    self._ended = True
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None


class ConnectionLimits:
  """The two deadlines (see the module docstring) and their counts. header_timeout: seconds for a whole request
  head; close_timeout: seconds a closed connection may keep unread bytes before it is reset. Runs on the event
  loop only (no locks)."""

  def __init__(self, *, header_timeout: float = 60.0, close_timeout: float = 60.0):
    if not (header_timeout > 0 and close_timeout > 0):
      raise ValueError(f"need header_timeout > 0 and close_timeout > 0, got {header_timeout}, {close_timeout}")
    self.header_timeout, self.close_timeout = header_timeout, close_timeout
    self._counts: collections.Counter = collections.Counter()
    self.protocol = self._protocol_class()

  def stats(self) -> dict:
    """closed_header_timeout: connections closed because they sent nothing for header_timeout seconds;
    refused_header_timeout: those answered 408 because their request head was not whole by then; reset_unread:
    closed connections reset because the client left their last bytes unread for close_timeout seconds."""
    return dict(self._counts)

  def _timeout_answer(self) -> bytes:
    """The raw 408 (h11 sends a response only to a request whose head it has read)."""
    error = msg.RequestError(f"the request's headers did not arrive within {self.header_timeout:g} s", status=408,
                             code="request_timeout")
    body = json.dumps(error.body()).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))

  def _protocol_class(self) -> type:
    limits = self

    class Protocol(H11Protocol):
      """uvicorn's h11 protocol with the request-head and close deadlines. The head deadline runs whenever no
      request is being answered: from the connection's opening and from each answer's end until the next
      request's head has been read (so also while the rest of a body the app answered without reading arrives)."""

      _head_timer: asyncio.TimerHandle | None = None
      _timed_out = False

      def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = _ResettingTransport(transport, self.loop, limits.close_timeout,
                                             lambda: limits._counts.update(["reset_unread"]))
        self._await_head()

      def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        self.transport.lost()  # first: uvicorn's own connection_lost closes the transport again
        super().connection_lost(exc)

      def data_received(self, data: bytes) -> None:
        if self._timed_out:  # answered 408: what still arrives is read and dropped until the close
          return
        super().data_received(data)
        if self._answering():
          self._stop_head_timer()
        elif self._head_timer is None:
          self._await_head()

      def on_response_complete(self) -> None:
        super().on_response_complete()  # may read a pipelined request's head at once
        if not self._answering():
          self._await_head()

      def _answering(self) -> bool:
        """Whether a request's head has been read and its answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

      def _await_head(self) -> None:
        self._stop_head_timer()
        if not self.transport.is_closing():
          self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

      def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
          self._head_timer.cancel()
          self._head_timer = None

      def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._answering():
          return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request head is buffered
          limits._counts["refused_header_timeout"] += 1
          self.transport.write(limits._timeout_answer())
          # A close with unread bytes in the socket makes the kernel send a reset, which may reach the client
          # before it has read the 408: end the sending side, keep reading (and dropping) for a moment, then close.
          self._timed_out = True
          if self.transport.can_write_eof():
            self.transport.write_eof()
          self.loop.call_later(LINGER_S, self.transport.close)
          return
        # Nothing of a next request was sent (or only the rest of a body the app answered without reading it).
        limits._counts["closed_header_timeout"] += 1
        self.transport.close()

    return Protocol
