"""The OpenAI-compatible HTTP API (FastAPI): `POST /v1/chat/completions`, `POST /v1/completions` (a prompt as it is,
no template: the base model's prompts, images as `<img>URL</img>` spans), `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus, `metrics`), and the chat page at `/`.

Each request is parsed and checked on a worker thread (tokenizing and image decoding are CPU work), submitted to
the engine, and answered from a `_Mailbox` the engine thread fills: the event loop never waits on the device. The
engine delivers several tokens per device call (`Engine.decode_steps`); they wake the loop once and go out as one
chunk, so the per-token cost of the HTTP side (wake-ups, JSON, socket writes) is paid per call, not per token.
`stream: true` answers with server-sent events in OpenAI's chunk format (`data: {...}` lines, then
`data: [DONE]`). A client that goes away (the stream is cancelled, or a non-streaming client disconnects) cancels
its request, which frees its decode slot at the engine's next turn.

Extensions (the way vLLM spells them): `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`; `ignore_eos`
(decode to max_tokens; for benchmarks); `min_tokens` (no stop token can be picked, and no stop string ends the
answer, before that many tokens); `prompt_logprobs` (each prompt token's log-probability, rank and most likely
alternatives: on each choice of a text completion, beside the choices of a chat one; not with streaming). vLLM's
other sampling extras (`best_of`, `use_beam_search`, `length_penalty`) get a 400 unless they have their no-op
value.

Grounding: the final message carries `boxes` (an extension field), the answer's `<ref>`/`<box>` pairs in the
[0, 1000) grid and in pixels of the latest image of the conversation; the text keeps the tags as generated.

Safety: every bad request gets a 4xx JSON body in OpenAI's error shape (`messages.RequestError`), malformed JSON
included; optional bearer key on `/v1/*` (`auth`, checked before anything else); limits on images (bytes, pixels,
count), prompt + max_tokens (the engine's context) and max_tokens; on the request body's size and stalls, and on
the requests held at once (`limits`: 413, 408, 429); on the request head's arrival and on a closed connection's
unread bytes (`connection`, the uvicorn protocol `uvicorn_config` sets).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import pathlib
import secrets
import threading
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qwenvl_jax import text as qtext
from qwenvl_jax.inference import slot_programs, slot_sampling
from qwenvl_jax.serving import auth
from qwenvl_jax.serving import connection as connection_lib
from qwenvl_jax.serving import engine as engine_lib
from qwenvl_jax.serving import limits as limits_lib
from qwenvl_jax.serving import messages as msg
from qwenvl_jax.serving import metrics as metrics_lib
from qwenvl_jax.serving import tokenizer_api
from qwenvl_jax.serving.detokenize import Detokenizer, token_piece

STATIC = pathlib.Path(__file__).resolve().parent / "static"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """model_name: the id served on /v1/models; chat_format, system: the prompt format and default system message;
  max_tokens_limit: the largest max_tokens accepted; defaults for omitted sampling fields (Qwen-VL-Chat's
  generation config: temperature 1, top_p 0.3, top_k 0); api_key: bearer key for /v1/* (None = open);
  cors_origins: web origins whose pages may call the API from a browser ("*" = any; none by default, so only the
  server's own chat page can); max_request_bytes: the largest request body (None: room for the most images of
  the largest size as data: URLs, `limits.default_max_body_bytes`); body_timeout: seconds a request body may send
  nothing; send_timeout: seconds one write of an answer may wait for the client to read (then the answer is cut
  and its slot freed; also how long a closed connection may leave its last bytes unread before it is reset);
  header_timeout: seconds a connection may take to send a whole request head (`connection`); max_waiting: the
  most requests held beyond the engine's decode slots (being received, checked or queued); more are answered 429
  (`limits`)."""
  model_name: str
  chat_format: str = "chatml"
  system: str = qtext.DEFAULT_SYSTEM
  max_tokens_limit: int = 1024
  images: msg.ImagePolicy = dataclasses.field(default_factory=msg.ImagePolicy)
  default_temperature: float = 1.0
  default_top_p: float = qtext.CHAT_TOP_P
  default_top_k: int = qtext.CHAT_TOP_K
  api_key: str | None = None
  max_window_size: int = qtext.DEFAULT_MAX_WINDOW_SIZE
  cors_origins: tuple[str, ...] = ()
  max_request_bytes: int | None = None
  body_timeout: float = 60.0
  send_timeout: float = 60.0
  header_timeout: float = 60.0
  max_waiting: int = 128


def _error(e: msg.RequestError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _number(body: dict, name: str, kind, default, low, high):
  value = body.get(name, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
    raise msg.RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}", param=name)
  if not low <= value <= high:
    raise msg.RequestError(f"{name} must be in [{low}, {high}], got {value}", param=name)
  return kind(value)


def _refuse_unsupported(body: dict) -> None:
  """OpenAI fields this server does not implement: a request that sets one to anything but its no-op value gets a
  400 naming it, instead of an answer that silently ignores it (fields with no effect on the answer, such as
  `user`, `metadata` or `store`, are accepted and ignored, as are unknown ones)."""
  for name, no_op in (("best_of", body.get("n", 1)), ("use_beam_search", False),
                      ("length_penalty", 1)):  # vLLM's sampling extras
    if name in body and body[name] != no_op:
      raise msg.RequestError(f"{name} is not supported by this server", param=name)
  if body.get("response_format", {"type": "text"}) != {"type": "text"}:
    raise msg.RequestError("response_format is not supported by this server (only {\"type\": \"text\"})",
                           param="response_format")
  for name in ("tools", "functions"):
    if body.get(name, []) != []:
      raise msg.RequestError(f"{name} (function calling) is not supported by this server", param=name)
  for name in ("tool_choice", "function_call"):
    if body.get(name, "none") not in ("none", "auto"):
      raise msg.RequestError(f"{name} (function calling) is not supported by this server", param=name)
  if body.get("modalities", ["text"]) != ["text"]:
    raise msg.RequestError("this server answers in text only (modalities: [\"text\"])", param="modalities")
  for name in ("audio", "web_search_options"):  # audio output, web search: any value asks for them
    if name in body:
      raise msg.RequestError(f"{name} is not supported by this server", param=name)


def _penalties(body: dict) -> dict:
  """`SamplingParams` fields of OpenAI's frequency_penalty and presence_penalty ([-2, 2]) and vLLM's
  repetition_penalty ((0, 2]) and min_p ([0, 1])."""
  out = {name: _number(body, name, float, 0.0, -2.0, 2.0) for name in ("frequency_penalty", "presence_penalty")}
  out["repetition_penalty"] = _number(body, "repetition_penalty", float, 1.0, 0.0, 2.0)
  if out["repetition_penalty"] <= 0:
    raise msg.RequestError("repetition_penalty must be > 0", param="repetition_penalty")
  out["min_p"] = _number(body, "min_p", float, 0.0, 0.0, 1.0)
  return out


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
  """`SamplingParams.logit_bias` of OpenAI's `logit_bias`: {token id as a string: bias in [-100, 100]}, at most
  `slot_programs.MAX_LOGIT_BIAS` entries, ids of the tokenizer's vocabulary."""
  bias = body.get("logit_bias", {})
  if not isinstance(bias, dict):
    raise msg.RequestError("logit_bias must be an object mapping token ids to biases", param="logit_bias")
  if len(bias) > slot_programs.MAX_LOGIT_BIAS:
    raise msg.RequestError(f"logit_bias has {len(bias)} entries; at most {slot_programs.MAX_LOGIT_BIAS}",
                           param="logit_bias")
  out = []
  for key, value in bias.items():
    if not (key.isascii() and key.isdigit()) or not int(key) < vocab_size:
      raise msg.RequestError(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
      raise msg.RequestError(f"logit_bias[{key!r}] must be a number in [-100, 100]", param="logit_bias")
    out.append((int(key), float(value)))
  return tuple(sorted(out))


def _stop_token_ids(body: dict) -> frozenset[int]:
  ids = body.get("stop_token_ids", [])
  if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
    raise msg.RequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
  return frozenset(ids)


def _legacy_logprobs(body: dict) -> int | None:
  """`SamplingParams.logprobs` of a text completion's `logprobs`: the number of alternatives (0 .. 20; 0 = the
  chosen tokens' alone), absent = none."""
  if "logprobs" not in body:
    return None
  return _number(body, "logprobs", int, 0, 0, slot_sampling.TOP_LOGPROBS)


def _prompt_logprobs(body: dict) -> int | None:
  """vLLM's `prompt_logprobs` (0 .. 20 alternatives per prompt token, absent = none); as vLLM's, not with
  `stream: true`."""
  if "prompt_logprobs" not in body:
    return None
  top = _number(body, "prompt_logprobs", int, None, 0, slot_sampling.TOP_LOGPROBS)
  if body.get("stream", False):
    raise msg.RequestError("prompt_logprobs is not available with stream: true", param="prompt_logprobs")
  return top


def _logprobs(body: dict) -> int | None:
  """`SamplingParams.logprobs` of OpenAI's `logprobs` (bool) and `top_logprobs` (0 .. 20, only with logprobs)."""
  wanted = body.get("logprobs", False)
  if not isinstance(wanted, bool):
    raise msg.RequestError("logprobs must be a boolean", param="logprobs")
  top = _number(body, "top_logprobs", int, 0, 0, slot_sampling.TOP_LOGPROBS)
  if "top_logprobs" in body and not wanted:
    raise msg.RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
  return top if wanted else None


COMPLETION_MAX_TOKENS = 16


class _Disconnected(Exception):
  """The client of a non-streaming request went away."""


def _json_logprob(logprob: float | None) -> float | None:
  """A log-probability as OpenAI writes it: -9999 for zero probability (JSON has no -inf)."""
  return None if logprob is None else max(logprob, -9999.0)


@dataclasses.dataclass(eq=False)
class _Choice:
  """One of a request's choices: its engine request, its text, and the log-probability entries of its tokens not
  yet sent, each (token id, log-probability, ((id, log-probability) of the alternatives, ...)): rendered as a chat's
  `logprobs.content` or a text completion's lists only when they are sent. An echoed prompt's first token has
  neither (None, None): nothing comes before it."""
  request: engine_lib.Request
  text: Detokenizer
  finished: bool = False
  entries: list = dataclasses.field(default_factory=list)
  lead: str = ""  # the echoed prompt, sent with the choice's first event
  prompt: engine_lib.PromptTokens | None = None  # the prompt's scores, once they came


class _Mailbox:
  """Engine events for one request, handed from the engine thread to the event loop: `put` (engine thread) wakes
  the loop only when it is not already woken, and `get_all` takes every event that arrived meanwhile."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self._loop = loop
    self._items: collections.deque = collections.deque()
    self._ready = asyncio.Event()
    self._lock = threading.Lock()
    self._woken = False

  def put(self, event) -> None:
    with self._lock:
      self._items.append(event)
      if self._woken:
        return
      self._woken = True
    self._loop.call_soon_threadsafe(self._wake)

  def _wake(self) -> None:
    with self._lock:
      self._woken = False
    self._ready.set()

  async def get_all(self) -> list:
    while True:
      with self._lock:
        if self._items:
          items = list(self._items)
          self._items.clear()
          return items
      self._ready.clear()
      await self._ready.wait()


class _Stream(StreamingResponse):
  """A StreamingResponse that closes its generator however the sending ends: when a send raises (the client read
  nothing for `send_timeout`, `limits`), the generator's clean-up (cancelling the request, which frees its slot)
  runs at once instead of whenever the suspended generator happens to be garbage-collected."""

  async def stream_response(self, send) -> None:
    try:
      await super().stream_response(send)
    finally:
      await self.body_iterator.aclose()


class _Completion:
  """One request's parsed pieces: its prompts (a chat's one, or a text completion's list), n choices of each,
  every choice an engine request of its own (choice i answers prompt i // n); chat: a chat completion
  (`/v1/chat/completions`), else a text completion (`/v1/completions`); echo: a text completion's text starts with
  its prompt (as sent; a token prompt decoded), and with logprobs its entries with the prompt's tokens (the first
  has no log-probability: nothing comes before it), as OpenAI's legacy `echo`; prompt_top: vLLM's
  `prompt_logprobs` (alternatives per prompt token), or None."""

  def __init__(self, prompts: list[msg.Prompt], params: engine_lib.SamplingParams, stop, stream: bool,
               include_usage: bool, n: int = 1, chat: bool = True, echo: bool = False,
               prompt_top: int | None = None, image_ids: tuple[int, int] = (-1, -1)):
    self.prompts, self.params, self.stop, self.stream = prompts, params, stop, stream
    self.include_usage, self.n, self.chat, self.echo = include_usage, n, chat, echo
    self.prompt_top = prompt_top
    self._image_ids = image_ids  # the tokenizer's <imgpad>, </img> ids (`_echo_widths`)
    self._offsets = [0] * (n * len(prompts))  # `legacy_logprobs`' text offset of each choice
    # How many of each choice's echoed prompt entries `legacy_logprobs` has placed (None: it has none).
    self._echoed: list[int | None] = [0 if echo and params.logprobs is not None else None] * (n * len(prompts))
    self._widths: dict[int, list[int]] = {}  # prompt index -> `_echo_widths`

  @property
  def choices(self) -> int:
    return self.n * len(self.prompts)

  def prompt_of(self, choice: int) -> msg.Prompt:
    return self.prompts[choice // self.n]

  def prompt_tokens(self) -> int:
    """usage's prompt_tokens: every prompt once, however many choices it has."""
    return sum(len(p.tokens) for p in self.prompts)

  def legacy_logprobs(self, index: int, entries: list[tuple], piece) -> dict:
    """A text completion's `logprobs` of choice `index`'s entries (`_Choice.entries`; `piece`: a token's text and
    bytes): `tokens`, `token_logprobs`, `top_logprobs` as {token: logprob}, and `text_offset`, where each token's
    text starts in the choice's text, counted on from the choice's earlier chunks. Built straight from the entries
    (an echoed prompt has one per prompt token: lm-evaluation-harness's scoring sends hundreds)."""
    texts = [piece(token_id)[0] for token_id, _, _ in entries]
    offsets, at = [], self._offsets[index]
    prompt, echoed = self.prompt_of(index), self._echoed[index]
    widths = self._echo_widths(index // self.n, piece) if echoed is not None else []
    for text in texts:
      offsets.append(at)
      if echoed is not None and echoed < len(prompt.tokens):  # an echoed prompt token: where it is in the prompt
        at += widths[echoed]
        echoed += 1
        if echoed == len(prompt.tokens):
          at = len(prompt.raw_text)  # the answer follows the prompt as it was sent
      else:
        at += len(text)
    self._offsets[index], self._echoed[index] = at, echoed
    return {"tokens": texts, "token_logprobs": [_json_logprob(lp) for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {piece(i)[0]: _json_logprob(lp) for i, lp in top}
                             for _, _, top in entries],
            "text_offset": offsets}

  def _echo_widths(self, prompt_index: int, piece) -> list[int]:
    """How many characters of prompt `prompt_index`'s text as sent each of its tokens stands for: its own text's,
    but in an image span, `<img>SOURCE</img>`, whose 256 `<imgpad>` tokens stand for SOURCE: all of them start
    where it does, and the last covers it."""
    if prompt_index not in self._widths:
      prompt = self.prompts[prompt_index]
      pad, end = self._image_ids
      sources = iter(qtext.IMAGE_SPAN.findall(prompt.raw_text))
      tokens = list(prompt.tokens)
      widths = [(len(next(sources)) if following == end else 0) if token_id == pad else len(piece(token_id)[0])
                for token_id, following in zip(tokens, tokens[1:] + [None])]
      self._widths[prompt_index] = widths
    return self._widths[prompt_index]

  def choice_params(self) -> list[engine_lib.SamplingParams]:
    """The sampling of each choice: the j-th choice of a prompt draws with seed + j (mod 2^64), so that sampled
    choices differ and each is what one request of that seed answers; greedy choices are all the same answer, as
    OpenAI's."""
    return [dataclasses.replace(self.params, seed=(self.params.seed + i % self.n) % 2 ** 64)
            for i in range(self.choices)]


def create_app(engine: engine_lib.Engine, tok: qtext.Tokenizer, config: ServerConfig) -> FastAPI:
  """The FastAPI app serving `engine` (already started) with tokenizer `tok`."""
  app = FastAPI(title="qwenvl_jax", docs_url=None, redoc_url=None)
  max_body = config.max_request_bytes or limits_lib.default_max_body_bytes(engine.max_images, config.images)
  limits = limits_lib.RequestLimits(max_open=engine.num_slots + config.max_waiting, max_body_bytes=max_body,
                                    body_timeout=config.body_timeout, send_timeout=config.send_timeout,
                                    counted_paths=("/v1/chat/completions", "/v1/completions", "/tokenize"))
  app.add_middleware(limits.middleware)
  # The connection's deadlines live in uvicorn's protocol, which `uvicorn_config` takes from here.
  app.state.connections = connection_lib.ConnectionLimits(header_timeout=config.header_timeout,
                                                          close_timeout=config.send_timeout)
  if config.api_key is not None:  # outside the limits: a client without the key gets 401, never 413 or 429
    app.add_middleware(auth.require_key, api_key=config.api_key)
  if config.cors_origins:  # added last, so outermost: the key's and the limits' refusals carry its headers too
    app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])
  cfg = engine.cfg
  created = int(time.time())
  metrics = metrics_lib.ServerMetrics(engine, limits, app.state.connections)

  @app.exception_handler(msg.RequestError)
  async def _request_error(_, e: msg.RequestError):
    return _error(e)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(_, e: RequestValidationError):
    return _error(msg.RequestError(f"invalid request: {e.errors()[:3]}"))

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    return _error(msg.RequestError(str(e.detail), status=e.status_code, type_="invalid_request_error"))

  @app.get("/health")
  async def health():
    stats = engine.stats()
    return JSONResponse({"status": "ok" if stats["healthy"] else "failed", "model": config.model_name, **stats,
                         **limits.stats(), **app.state.connections.stats()},
                        status_code=200 if stats["healthy"] else 503)

  def _model_card() -> dict:
    return {"id": config.model_name, "object": "model", "created": created, "owned_by": "qwenvl_jax",
            "context_length": engine.context}

  @app.get("/metrics")
  async def prometheus_metrics():
    return Response(metrics.render(), media_type=metrics_lib.CONTENT_TYPE)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [_model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def model(model_id: str):
    msg.check_model(model_id, config.model_name)
    return _model_card()

  @app.get("/")
  async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")

  def _chat_prompt(messages, context: int | None = engine.context) -> msg.Prompt:
    return msg.build_prompt(messages, tok, image_tokens=cfg.image_tokens, image_size=cfg.vision.image_size,
                            policy=config.images, max_images=engine.max_images, chat_format=config.chat_format,
                            default_system=config.system, max_window_size=config.max_window_size, context=context)

  def _text_prompt(text, context: int | None = engine.context) -> msg.Prompt:
    return msg.build_raw_prompt(text, tok, image_tokens=cfg.image_tokens, image_size=cfg.vision.image_size,
                                policy=config.images, max_images=engine.max_images, context=context)

  # /tokenize takes texts past the context, as vLLM's: a harness tokenizes whole documents, then cuts windows.
  tokenizer_api.add_routes(app, tok, model_name=config.model_name, context=engine.context,
                           build_text=functools.partial(_text_prompt, context=None),
                           build_chat=functools.partial(_chat_prompt, context=None), piece=lambda t: piece(t),
                           chat_template=qtext.chat_template(config.system) if config.chat_format == "chatml" else None)

  def _parse(raw: bytearray, chat: bool = True) -> _Completion:
    """Runs on a worker thread: parses and checks the body, tokenizes, reads the images (parsing a body of tens of
    MB on the event loop would stall every stream). A field sent as JSON null counts as absent, as in OpenAI's
    API. chat: a chat completion's body (`messages`), else a text completion's (`prompt`)."""
    body = msg.json_body(raw)
    msg.check_model(body.get("model"), config.model_name)
    n = _number(body, "n", int, 1, 1, engine.num_slots)  # each choice takes a decode slot
    _refuse_unsupported(body)
    where = "messages" if chat else "prompt"
    if chat:
      prompts = [_chat_prompt(body.get("messages"))]
    else:
      if body.get("suffix", "") != "":
        raise msg.RequestError("suffix is not supported by this server", param="suffix")
      texts = body.get("prompt")
      if msg.is_token_prompt(texts):  # one prompt as token ids
        texts = [texts]
      elif not (isinstance(texts, list) and texts and all(isinstance(t, str) or msg.is_token_prompt(t)
                                                          for t in texts)):
        texts = [texts]  # one text prompt (or a malformed one, which `build_raw_prompt` refuses)
      if len(texts) * n > engine.num_slots + config.max_waiting:  # each choice of each prompt is a request
        raise msg.RequestError(f"{len(texts)} prompts x n={n} choices: at most {engine.num_slots + config.max_waiting} "
                               "in one request", param="prompt")
      prompts = [msg.build_token_prompt(t, tok, context=engine.context) if isinstance(t, list) else _text_prompt(t)
                 for t in texts]
    prompt = max(prompts, key=lambda p: len(p.tokens))  # the longest bounds max_tokens
    if not min(len(p.tokens) for p in prompts):
      raise msg.RequestError("the prompt is empty", param=where)
    room = engine.context - len(prompt.tokens)
    if room < 1:
      raise msg.RequestError(f"the prompt has {len(prompt.tokens)} tokens; the context is {engine.context}",
                             code="context_length_exceeded", param=where)
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    # A chat answer runs to the context by default; a text completion to 16 tokens (OpenAI's and vLLM's default).
    default = min(config.max_tokens_limit, room) if chat else min(COMPLETION_MAX_TOKENS, room)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
      raise msg.RequestError("echo must be a boolean", param="echo")
    if chat and echo:  # vLLM's chat `echo` (repeat the last message) is not OpenAI's
      raise msg.RequestError("echo is not supported on chat completions", param="echo")
    # max_tokens 0 answers with the prompt alone: what an echoed prompt's scores need (`echo`, `logprobs`).
    max_tokens = _number(body, name, int, default, 0 if echo else 1, config.max_tokens_limit)
    if max_tokens > room:
      raise msg.RequestError(f"the prompt has {len(prompt.tokens)} tokens and {name} is {max_tokens}: "
                             f"together more than the context of {engine.context}",
                             code="context_length_exceeded", param=name)
    temperature = _number(body, "temperature", float, config.default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", float, config.default_top_p, 0.0, 1.0)
    if top_p <= 0:
      raise msg.RequestError("top_p must be > 0", param="top_p")
    top_k = _number(body, "top_k", int, config.default_top_k, 0, 1 << 30)
    seed = body.get("seed")
    if seed is None:
      seed = secrets.randbits(64)
    else:
      seed = _number(body, "seed", int, None, *slot_sampling.SEED_RANGE)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise msg.RequestError("stream must be a boolean", param="stream")
    options = body.get("stream_options", {})
    if "stream_options" in body and not stream:
      raise msg.RequestError("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
      raise msg.RequestError("stream_options must be an object like {\"include_usage\": true}",
                             param="stream_options")
    include_usage = options.get("include_usage", False)
    stop = msg.as_list(body.get("stop"), "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
      raise msg.RequestError("ignore_eos must be a boolean", param="ignore_eos")
    logprobs = _logprobs(body) if chat else _legacy_logprobs(body)
    prompt_top = _prompt_logprobs(body)
    # The engine scores the prompt with the most alternatives either asks for; each answer takes its own count.
    wanted = [top for top in (logprobs if echo else None, prompt_top) if top is not None]
    params = engine_lib.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       seed=seed, ignore_stop_tokens=ignore_eos, logprobs=logprobs,
                                       **_penalties(body), stop_token_ids=_stop_token_ids(body),
                                       prompt_logprobs=max(wanted) if wanted else None,
                                       logit_bias=_logit_bias(body, tok.vocab_size),
                                       min_tokens=_number(body, "min_tokens", int, 0, 0, max_tokens))
    if problem := engine.held_ids_problem(params):  # a 400 naming its field (the engine's check would name none)
      raise msg.RequestError(problem, param="stop_token_ids")
    return _Completion(prompts, params, stop, stream, include_usage, n, chat, echo, prompt_top,
                       (tok.img_pad_id, tok.img_end_id))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: HttpRequest):
    return await _answer(request, chat=True)

  @app.post("/v1/completions")
  async def completions(request: HttpRequest):
    return await _answer(request, chat=False)

  async def _answer(request: HttpRequest, chat: bool):
    raw = bytearray()  # not `request.body()`, whose copy the request keeps while the answer is decoded
    try:
      async for chunk in request.stream():
        raw += chunk
    except ClientDisconnect:  # the client left while sending its request: no one to answer, nothing to log
      return JSONResponse({}, status_code=499)
    job = await asyncio.to_thread(_parse, raw, chat)
    del raw
    events = _Mailbox(asyncio.get_running_loop())  # every choice's events, as (choice index, event)
    choices = []
    for i, params in enumerate(job.choice_params()):
      prompt = job.prompt_of(i)
      sink = lambda event, i=i: events.put((i, event))  # noqa: E731  (the engine calls it on its thread)
      choices.append(_Choice(engine_lib.Request(prompt.tokens, prompt.images, params, sink),
                             Detokenizer(tok.decode, job.stop, params.min_tokens),
                             lead=prompt.raw_text if job.echo else ""))
    try:
      engine.submit_all([c.request for c in choices])  # all or none; admitted together, their prompt prefilled once
    except (ValueError, RuntimeError) as e:
      if isinstance(e, ValueError):  # `_parse` checked the prompt and the context: what is left is the image count
        raise msg.RequestError(str(e), param="messages" if chat else "prompt") from None
      raise msg.RequestError(str(e), status=503, type_="server_error") from None
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": config.model_name}
    if job.stream:
      return _Stream(_stream(job, choices, events, head), media_type="text/event-stream",
                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, job, choices, events, head)

  def _chunk(head: dict, job, text: str | None, entries: list | None, finish_reason=None, index: int = 0,
             **extra) -> str:
    """One server-sent event; `head`: the id, created time and model every chunk of a completion shares. text:
    the new text (None: the chat's role chunk); entries: the log-probability entries of its tokens (None: the
    request asked for none)."""
    if job.chat:
      delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
      choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                "logprobs": None if entries is None else {"content": _chat_entries(entries)}}
    else:
      choice = {"index": index, "text": text, "finish_reason": finish_reason,
                "logprobs": None if entries is None else job.legacy_logprobs(index, entries, piece)}
    body = {**head, "object": "chat.completion.chunk" if job.chat else "text_completion", "choices": [choice],
            **extra}
    if job.include_usage:
      body["usage"] = None  # OpenAI: null on every chunk but the last, which carries the counts
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

  def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

  piece = functools.lru_cache(maxsize=1 << 16)(functools.partial(token_piece, tok.decode))

  def _token(token_id: int, logprob: float | None) -> dict:
    """OpenAI's fields of one token: text and bytes (`token_piece`), and the log-probability."""
    text, raw = piece(token_id)
    return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(raw)}

  def _chat_entries(entries: list[tuple]) -> list[dict]:
    """A chat's `logprobs.content` of `_Choice.entries`."""
    return [{**_token(token_id, lp), "top_logprobs": None if top is None else [_token(i, l) for i, l in top]}
            for token_id, lp, top in entries]

  def _logprob_entry(ev: engine_lib.Token, top: int | None = None) -> tuple:
    return ev.token_id, ev.logprob, ev.top_logprobs[:top]

  def _prompt_entries(prompt: list[int], ev: engine_lib.PromptTokens, top: int) -> list[tuple]:
    """The entries of an echoed prompt: its first token has no log-probability (nothing comes before it)."""
    return [(prompt[0], None, None), *(_logprob_entry(t, top) for t in ev.tokens)]

  def _vllm_prompt_logprobs(ev: engine_lib.PromptTokens, top: int) -> list:
    """vLLM's `prompt_logprobs`: None for the first token, then per token {id: {logprob, rank, decoded_token}},
    the token itself first, then its position's `top` most likely tokens (ranks 1 ..)."""
    def one(token_id, logprob, rank):
      return {"logprob": _json_logprob(logprob), "rank": rank, "decoded_token": piece(token_id)[0]}

    out = [None]
    for t, rank in zip(ev.tokens, ev.ranks):
      entry = {str(t.token_id): one(t.token_id, t.logprob, rank)}
      for r, (i, lp) in enumerate(t.top_logprobs[:top], 1):
        entry.setdefault(str(i), one(i, lp, r))
      out.append(entry)
    return out

  def _take(job: _Completion, c: _Choice, ev) -> tuple[str, engine_lib.Finished | None]:
    """One engine event of choice `c`: (the text it adds, the choice's end or None). Its log-probability entry goes
    to `c.entries`: the token that completes a stop string has one, though the string's text is cut, and a stop
    token (never shown) has one in a text completion only. A stop string cancels the engine request. An echoed
    prompt goes out with the choice's first event (`_Choice.lead`), its tokens' entries (`engine.PromptTokens`)
    before the answer's."""
    lead, c.lead = c.lead, ""
    delta, end = _take_event(job, c, ev)
    return lead + delta, end

  def _take_event(job: _Completion, c: _Choice, ev) -> tuple[str, engine_lib.Finished | None]:
    req, text = c.request, c.text
    if isinstance(ev, engine_lib.PromptTokens):
      c.prompt = ev
      if job.echo and job.params.logprobs is not None:  # echo's entries, with echo's own count of alternatives
        c.entries.extend(_prompt_entries(list(req.prompt), ev, job.params.logprobs))
      return "", None
    if isinstance(ev, engine_lib.Token):
      if not text.num_tokens:
        metrics.first_token(time.monotonic() - req.submitted)
      delta = text.add(ev.token_id)
      if ev.logprob is not None:
        c.entries.append(_logprob_entry(ev))
      if not text.stopped:
        return delta, None
      engine.cancel(req, reason="stop")
      ev = engine_lib.Finished("stop", len(req.prompt), text.num_tokens)
    elif isinstance(ev, engine_lib.Finished):
      if not text.num_tokens and ev.completion_tokens:  # the first token was a stop token
        metrics.first_token(time.monotonic() - req.submitted)
      delta = text.finish()
      if not job.chat and ev.stop_token is not None and ev.stop_token.logprob is not None:
        # A text completion's entries end with the stop token (never shown), as vLLM's: lm-evaluation-harness
        # scores an echoed prompt with max_tokens 1 and drops the last entry as the generated one.
        c.entries.append(_logprob_entry(ev.stop_token))
    else:
      raise msg.RequestError(ev.message, status=503, type_="server_error")
    metrics.finished(time.monotonic() - req.submitted, ev.prompt_tokens, ev.completion_tokens)
    return delta, ev

  async def _answers(job: _Completion, choices, events: _Mailbox, poll=None):
    """(choice index, delta text, entries, end or None) for each choice a batch of events moved, until every choice
    ended; a choice's entries wait while its text is held back (a partial character, a possible stop string).
    poll: an async callable awaited whenever nothing came for 0.5 s (it raises to end the answer, e.g. when the
    client left)."""
    running = len(choices)
    while running:
      try:
        batch = await (asyncio.wait_for(events.get_all(), timeout=0.5) if poll else events.get_all())
      except asyncio.TimeoutError:
        await poll()
        continue
      moved: dict[int, list] = {}  # choice index -> [delta, end], in the order the choices came
      for i, ev in batch:
        c = choices[i]
        if c.finished:  # tokens of a choice a stop string ended, decoded before its cancel arrived
          continue
        delta, end = _take(job, c, ev)
        item = moved.setdefault(i, ["", None])
        item[0] += delta
        if end is not None:
          item[1], c.finished = end, True
          running -= 1
      for i, (delta, end) in moved.items():
        if delta or end is not None:
          c = choices[i]
          entries, c.entries = c.entries, []
          yield i, delta, entries, end

  async def _stream(job, choices, events, head):
    wanted = job.params.logprobs is not None
    usage = 0
    try:
      for i in range(job.choices if job.chat else 0):
        yield _chunk(head, job, None, None, index=i)
      async for i, delta, entries, end in _answers(job, choices, events):
        if delta:
          yield _chunk(head, job, delta, entries if wanted else None, index=i)
          entries = []
        if end is not None:
          usage += end.completion_tokens
          boxes = msg.boxes_in_pixels(choices[i].text.text, job.prompt_of(i))
          # Entries of tokens whose text never came (a stop string cut it all) go with the last chunk.
          yield _chunk(head, job, "", entries if entries else None, end.reason, index=i, boxes=boxes)
      if job.include_usage:
        body = {**head, "object": "chat.completion.chunk" if job.chat else "text_completion", "choices": [],
                "usage": _usage(job.prompt_tokens(), usage)}
        yield f"data: {json.dumps(body)}\n\n"
      yield "data: [DONE]\n\n"
    except msg.RequestError as e:
      yield f"data: {json.dumps(e.body())}\n\n"
    finally:
      for c in choices:
        if not c.finished:
          engine.cancel(c.request)  # the client went away mid-stream: free the slots now

  async def _complete(request: HttpRequest, job, choices, events, head):
    async def poll():
      # A non-streaming client that went away frees its slots too.
      if await request.is_disconnected():
        raise _Disconnected()

    ends, entries = [None] * job.choices, [[] for _ in range(job.choices)]
    try:
      async for i, _, more, end in _answers(job, choices, events, poll):
        entries[i] += more
        if end is not None:
          ends[i] = end
    except _Disconnected:
      return JSONResponse({}, status_code=499)
    finally:
      for c in choices:  # the client left, or an engine failure ended one choice: free the others' slots
        if not c.finished:
          engine.cancel(c.request)
    out = []
    wanted = job.params.logprobs is not None
    for i, (c, end) in enumerate(zip(choices, ends)):
      boxes = msg.boxes_in_pixels(c.text.text, job.prompt_of(i))  # the answer's, never the echoed prompt's
      if job.chat:
        out.append({"index": i, "message": {"role": "assistant", "content": c.text.text, "boxes": boxes},
                    "finish_reason": end.reason,
                    "logprobs": {"content": _chat_entries(entries[i])} if wanted else None})
      else:
        echoed = job.prompt_of(i).raw_text if job.echo else ""
        out.append({"index": i, "text": echoed + c.text.text, "finish_reason": end.reason, "boxes": boxes,
                    "logprobs": job.legacy_logprobs(i, entries[i], piece) if wanted else None})
        if job.prompt_top is not None:  # vLLM's: on each choice of a text completion
          out[-1]["prompt_logprobs"] = _vllm_prompt_logprobs(c.prompt, job.prompt_top)
    answer = {**head, "object": "chat.completion" if job.chat else "text_completion", "choices": out,
              "usage": _usage(job.prompt_tokens(), sum(end.completion_tokens for end in ends))}
    if job.chat and job.prompt_top is not None:  # vLLM's: once, beside the choices (they share the prompt)
      answer["prompt_logprobs"] = _vllm_prompt_logprobs(choices[0].prompt, job.prompt_top)
    # Rendered as it is (JSON's own types), not through FastAPI's jsonable_encoder, which walks every value of a
    # returned dict in Python: of the 0.73 ms that rendering a 101-entry echo took, 0.5 ms.
    return JSONResponse(answer)

  return app


def uvicorn_config(app, host: str, port: int, connections: connection_lib.ConnectionLimits | None = None):
  """uvicorn's config serving `app` on host:port with the connection deadlines of `connections` (by default those
  `create_app` made, or the defaults for another ASGI app)."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  connections = connections or getattr(getattr(app, "state", None), "connections", None)
  connections = connections or connection_lib.ConnectionLimits()
  # ws="none": the app has no WebSocket routes, and an upgraded connection would leave the protocol above.
  return uvicorn.Config(app, host=host, port=port, log_level="warning", http=connections.protocol, ws="none")


class ThreadedServer:
  """uvicorn serving `app` on host:port (port 0 = a free one) in a daemon thread: for tests and benchmarks that
  need a real HTTP server next to the code that drives it (`connections`: as `uvicorn_config`)."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0,
               connections: connection_lib.ConnectionLimits | None = None):
    import socket  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    import uvicorn  # pylint: disable=import-outside-toplevel
    if not port:
      with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    self.port, self.url = port, f"http://{host}:{port}"
    self._server = uvicorn.Server(uvicorn_config(app, host, port, connections))
    self._thread = threading.Thread(target=self._server.run, daemon=True, name="uvicorn")
    self._thread.start()
    deadline = time.monotonic() + start_timeout
    while not self._server.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError(f"uvicorn did not start on {self.url}")
      time.sleep(0.02)

  def stop(self) -> None:
    self._server.should_exit = True
    self._thread.join(10)
