"""The API key of `serve --api_key`: an ASGI middleware requiring `Authorization: Bearer KEY` on /v1/* and on the
tokenizer's endpoints (`tokenizer_api`: /tokenize reads images as the completions do).

It runs before the request limits (`limits`), so a client without the key gets 401 and nothing else: not 429 with
the server's load, nor 413 with its body limit. The answer closes the connection (the body is never read). The key
is compared as bytes in constant time: a header holding non-ASCII characters is a wrong key (Python's
`secrets.compare_digest` refuses non-ASCII str, which made it a 500).
"""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenvl_jax.serving import messages as msg

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def require_key(app: ASGIApp, *, api_key: str) -> ASGIApp:
  """`app` answering 401 (OpenAI's `invalid_api_key`) to a request under /v1/ or to `PROTECTED_PATHS` without
  `api_key` as its bearer key (for `app.add_middleware(require_key, api_key=...)`); the chat page, /health and
  /metrics stay open."""
  expected = api_key.encode()

  async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope.get("path", "")
    if scope["type"] == "http" and (path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS):
      scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
      # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent.
      if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode("latin-1"), expected):
        e = msg.RequestError("invalid or missing API key (Authorization: Bearer <key>)", status=401,
                             code="invalid_api_key", headers={"Connection": "close"})
        await JSONResponse(e.body(), e.status, headers=e.headers)(scope, receive, send)
        return
    await app(scope, receive, send)

  return guarded
