"""vLLM's tokenizer endpoints: `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`.

Clients that score through the server tokenize with the server's own tokenizer here instead of loading one of
their own (lm-evaluation-harness's `local-completions` model finds them and uses its "remote" tokenizer: it then
sends token-id prompts to `/v1/completions` with `echo` and `logprobs` for its likelihood tasks).

  POST /tokenize    {"prompt": TEXT} or {"messages": [...]}   -> {"count", "max_model_len", "tokens", "token_strs"}
  POST /detokenize  {"tokens": [ids]}                          -> {"prompt": TEXT}
  GET  /tokenizer_info                          -> {"eos_token", "model_max_length", "chat_template", ...}

A text is tokenized as `/v1/completions` takes it (`messages.build_raw_prompt`: special tokens recognized,
`<img>SOURCE</img>` spans read and expanded to the image's tokens), messages as `/v1/chat/completions` does
(`messages.build_prompt`: the chat format, ending with the assistant's turn), the context no limit (as vLLM's: a
harness tokenizes whole documents and cuts its own windows; `max_model_len` says how long one may be). Qwen has no
BOS token, so vLLM's `add_special_tokens` changes nothing; `add_generation_prompt: false` is refused (the chat
prompt always ends with the assistant's turn). Like `/v1/*`, these paths need the API key when the server has one
(`auth`). `chat_template` is a Jinja template of the chat format (`text.chat_template`, with the server's default
system message) that renders a text conversation to the chat endpoint's prompt text (lm-evaluation-harness's
`RemoteTokenizer.apply_chat_template` renders it); null for the raw (base model) format, which has no chat template.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import FastAPI, Request as HttpRequest

from qwenvl_jax import text as qtext
from qwenvl_jax.serving import messages as msg


def _flag(body: dict, name: str, default: bool) -> bool:
  value = body.get(name, default)
  if not isinstance(value, bool):
    raise msg.RequestError(f"{name} must be a boolean", param=name)
  return value


def add_routes(app: FastAPI, tok: qtext.Tokenizer, *, model_name: str, context: int,
               build_text: Callable[[str], msg.Prompt], build_chat: Callable[[list], msg.Prompt],
               piece: Callable[[int], tuple[str, bytes]], chat_template: str | None) -> None:
  """The three routes on `app` (whose handlers turn `messages.RequestError` into OpenAI's error shape).
  chat_template: what /tokenizer_info hands out (None for the raw format).
  build_text / build_chat: a text's / a messages list's `messages.Prompt` as the completion endpoints build it
  (they run on a worker thread: they may read images); piece: a token's text and bytes (`detokenize.token_piece`)."""

  def tokenize(raw: bytes) -> dict:
    body = msg.json_body(raw)
    msg.check_model(body.get("model"), model_name)
    _flag(body, "add_special_tokens", True)  # no BOS token: nothing to add either way
    strs = _flag(body, "return_token_strs", False)
    if ("prompt" in body) == ("messages" in body):
      raise msg.RequestError("send either prompt (a text) or messages (a chat)", param="prompt")
    if "messages" in body:
      if not _flag(body, "add_generation_prompt", True):
        raise msg.RequestError("add_generation_prompt must be true: the chat prompt ends with the assistant's turn",
                               param="add_generation_prompt")
      prompt = build_chat(body["messages"])
    else:
      prompt = build_text(body["prompt"])
    tokens = list(prompt.tokens)
    return {"count": len(tokens), "max_model_len": context, "tokens": tokens,
            "token_strs": [piece(t)[0] for t in tokens] if strs else None}

  def detokenize(raw: bytes) -> dict:
    body = msg.json_body(raw)
    msg.check_model(body.get("model"), model_name)
    return {"prompt": tok.decode(msg.check_token_ids(body.get("tokens"), tok.vocab_size, param="tokens"))}

  @app.post("/tokenize")
  async def tokenize_route(request: HttpRequest):
    return await asyncio.to_thread(tokenize, await request.body())

  @app.post("/detokenize")
  async def detokenize_route(request: HttpRequest):
    return await asyncio.to_thread(detokenize, await request.body())

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return {"tokenizer_class": type(tok).__name__, "eos_token": qtext.ENDOFTEXT, "bos_token": None,
            "pad_token": qtext.ENDOFTEXT, "model_max_length": context, "vocab_size": tok.vocab_size,
            "chat_template": chat_template}
