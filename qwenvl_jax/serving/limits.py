"""The HTTP server's request limits, an ASGI middleware around the app (`RequestLimits.middleware`): how large a
request body may be, how long it may stall, how many completion requests the server holds at once, and how long an
answer may wait for a client that reads nothing.

  * Body size: a Content-Length over `max_body_bytes` is answered 413 before any of the body is read (and before
    a `100 Continue`); a body without one (chunked) is counted as it arrives and answered 413 as soon as it passes
    the limit. uvicorn stops reading a socket while the app leaves the bytes it holds unread (64 KiB), so nothing
    much past the limit is ever buffered.
  * Body stalls: a body that sends nothing for `body_timeout` seconds is answered 408 (nginx's
    `client_body_timeout`: the wait between two reads, not the whole upload, so a slow link is not cut off).
  * Admission: a completion request counts from its headers to the last byte of its answer; while `max_open` are
    counted (the decode slots and the requests allowed to wait for one), the next is answered 429 at once, with
    Retry-After and before its body is read (TGI's `--max_concurrent_requests`). So the requests waiting, and the
    bodies held in memory, are bounded.
  * Answer stalls: uvicorn's `send` waits while the socket's buffers are full; a client that reads nothing for
    `send_timeout` seconds (nginx's `send_timeout`: the wait of one write, not the whole answer) has its answer cut:
    the app's `send` raises, so the app stops (a stream's generator is closed, which cancels its request and frees
    its decode slot) and the request stops counting. The answer is then ended if the client reads within another
    `send_timeout` (a chunked stream's end, without its final chunk and `[DONE]`, on a connection kept alive as any
    other; a bare 408 when nothing was sent yet); otherwise, and at once for an answer with a Content-Length (a
    JSON body cannot be ended early), the app returns without completing it and uvicorn closes the connection,
    logging one line (`closed_send_timeout` counts these). asyncio flushes what is already buffered (~100 KB)
    before it lets go of a closed socket; `connection` resets one whose client still reads nothing `send_timeout`
    later, and bounds the wait for a request's headers, which no ASGI middleware sees.

Every refusal is an OpenAI error body (`messages.RequestError`) and closes the connection, so the rest of a refused
body is never read. Starlette's `RequestBodyLimitMiddleware` (FastAPI's `max_body_size`) is not used: it answers a
Content-Length over its limit with a plain-text 413 whatever the app sends, and OpenAI clients parse errors as JSON.
"""

from __future__ import annotations

import asyncio
import collections

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenvl_jax.serving import messages as msg

TEXT_BYTES = 2 ** 20  # the default body limit's room for text and JSON beside the images
DATA_URL_OVERHEAD = 256  # an image part's JSON and its "data:image/png;base64," header
RETRY_AFTER_S = 1
_CLOSE = {"Connection": "close"}


class _ClientStalled(Exception):
  """Raised into the app by `send`: the client read nothing for `send_timeout` seconds."""


def default_max_body_bytes(max_images: int, images: msg.ImagePolicy) -> int:
  """Room for `max_images` images of the largest size `images` takes, sent as base64 data: URLs, plus 1 MiB."""
  return max_images * (images.max_base64_chars + DATA_URL_OVERHEAD) + TEXT_BYTES


class RequestLimits:
  """The limits and their counters; `middleware` is the ASGI middleware applying them (see the module docstring).

  max_open: the most completion requests held at once (`counted_paths`, POST); max_body_bytes: the largest
  request body; body_timeout: seconds a body may send nothing; send_timeout: seconds one write of an answer may
  wait for the client to read. Runs on the event loop only (no locks)."""

  def __init__(self, *, max_open: int, max_body_bytes: int, body_timeout: float, send_timeout: float = 60.0,
               counted_paths: tuple[str, ...] = ("/v1/chat/completions",)):
    self.max_open, self.max_body_bytes, self.body_timeout = max_open, max_body_bytes, body_timeout
    self.send_timeout = send_timeout
    self.counted_paths = counted_paths
    self.open = 0
    self._counts: collections.Counter = collections.Counter()

  def stats(self) -> dict:
    """open_requests: completion requests being received, checked, waiting for a slot or answered;
    refused_<why>: requests answered 429 (busy), 413 (too_large) or 408 (body_timeout); cancelled_send_timeout:
    answers cut because the client read nothing for `send_timeout` seconds; closed_send_timeout: those of them whose
    connection was closed unfinished (the client read nothing for another `send_timeout`, or the answer had a
    Content-Length)."""
    return {"open_requests": self.open, "max_open_requests": self.max_open, **self._counts}

  def middleware(self, app: ASGIApp) -> ASGIApp:
    """`app` with the limits applied (for `app.add_middleware(limits.middleware)`)."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
      if scope["type"] != "http":
        await app(scope, receive, send)
        return
      counted = scope["method"] == "POST" and scope["path"] in self.counted_paths
      refusal = self._too_large(Headers(scope=scope).get("content-length")) or (counted and self._busy())
      if refusal:
        await JSONResponse(refusal.body(), refusal.status, headers=refusal.headers)(scope, receive, send)
        return
      self.open += counted
      stalled, started, sized = False, False, False

      async def timed_send(message) -> None:
        nonlocal stalled, started, sized
        if stalled:
          raise _ClientStalled()
        try:
          async with asyncio.timeout(self.send_timeout):
            await send(message)
        except TimeoutError:
          stalled = True
          raise _ClientStalled() from None
        if message["type"] == "http.response.start":
          started = True
          sized = any(k.lower() == b"content-length" for k, _ in message.get("headers", ()))

      try:
        await app(scope, self._body_reader(receive), timed_send)
      except Exception:  # pylint: disable=broad-except  (however the app passed `_ClientStalled` on)
        if not stalled:
          raise
      finally:
        self.open -= counted
      if stalled:
        self._counts["cancelled_send_timeout"] += 1
        if started and sized:  # an empty last part would break the declared Content-Length (h11 raises)
          self._counts["closed_send_timeout"] += 1
          return  # uvicorn closes the connection ("returned without completing response", one log line)
        try:
          async with asyncio.timeout(self.send_timeout):  # the client gets as long again to read what is buffered
            if not started:
              await send({"type": "http.response.start", "status": 408,
                          "headers": [(b"content-length", b"0"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
          # Still nothing read: uvicorn closes the connection as above, so a client that keeps its connection
          # open and never reads cannot hold this coroutine, nor (with a proxy in front) its socket, for ever.
          self._counts["closed_send_timeout"] += 1

    return limited

  def _too_large(self, content_length: str | None) -> msg.RequestError | None:
    # h11 has checked the header: digits only, one value.
    if content_length is None or int(content_length) <= self.max_body_bytes:
      return None
    return self._refuse("too_large", f"the request body of {content_length} bytes is over this server's limit of "
                        f"{self.max_body_bytes} bytes", status=413, code="request_too_large")

  def _busy(self) -> msg.RequestError | None:
    if self.open < self.max_open:
      return None
    # OpenAI's "model is overloaded" error: 429, type server_error, no code.
    return self._refuse("busy", f"the server is busy: it holds its limit of {self.max_open} requests (decoding or "
                        f"waiting for a decode slot); retry in {RETRY_AFTER_S} s", status=429, type_="server_error",
                        code=None, headers={"Retry-After": str(RETRY_AFTER_S), **_CLOSE})

  def _refuse(self, why: str, message: str, **kw) -> msg.RequestError:
    self._counts[f"refused_{why}"] += 1
    kw.setdefault("headers", _CLOSE)
    return msg.RequestError(message, **kw)

  def _body_reader(self, receive: Receive) -> Receive:
    """`receive` that counts the body's bytes and times its waits, raising `RequestError` (the app's handler
    answers it) past the limit or after `body_timeout` seconds without a byte; past the body it is `receive`."""
    received, done = 0, False

    async def read():
      nonlocal received, done
      if done:  # the body has been read: what comes now is the disconnect, whenever the client leaves
        return await receive()
      try:
        message = await asyncio.wait_for(receive(), self.body_timeout)
      except TimeoutError:
        raise self._refuse("body_timeout", f"no bytes of the request body arrived for {self.body_timeout:g} s",
                           status=408, code="request_timeout") from None
      if message["type"] != "http.request":
        done = True
        return message
      received += len(message.get("body", b""))
      done = not message.get("more_body", False)
      if received > self.max_body_bytes:
        raise self._refuse("too_large", f"the request body is over this server's limit of {self.max_body_bytes} "
                           "bytes", status=413, code="request_too_large")
      return message

    return read
