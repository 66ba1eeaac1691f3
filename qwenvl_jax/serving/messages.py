"""OpenAI chat messages -> a Qwen-VL prompt: the reference's chat format, images fetched and checked.

Letters: S model image side.

A request's `messages` (`system`, then `user` / `assistant` turns; each content a string or a list of parts
`{"type": "text", "text": ...}` / `{"type": "image_url", "image_url": {"url": ...}}`) become the reference's
`make_context` input: every turn's parts are joined with `from_list_format` (`Picture k: <img>…</img>\\n` per
image, numbered per message, as the reference's tokenizer does), earlier turns are the history (a user turn not
answered gets a None response), the last message must be from the user. Images may sit in any turn; the history
window (`max_window_size`) may drop old turns, and with them their images.

Image URLs: `data:image/...;base64,...` (decoded here), a local path (only under `--image_root`, resolved with
symlinks so nothing outside it is read), or http(s) (only with `--allow_remote_images`; `remote_fetch.fetch`: one
deadline, `ImagePolicy.remote_timeout`, for the whole exchange). Each image is checked against the byte and pixel
limits before it is decoded in full, then stretched to S x S as the data pipeline does.
Text that itself holds `<img>…</img>` tags is refused: an image reaches the model only as an image part.

Every problem raises `RequestError` with an HTTP status and an OpenAI error body (never a traceback).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import io
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from qwenvl_jax import remote_fetch
from qwenvl_jax import text as qtext
from qwenvl_jax.data import images as image_lib

_KEY = "upload:{}"  # what an image part's <img> tag holds: a key into the request's images, never a path


class RequestError(Exception):
  """A bad request: `status` (4xx) and the OpenAI error body fields."""

  def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None,
               type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
    self.headers = headers  # of the HTTP answer (Retry-After, Connection: close)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
  """Where images may come from and how big they may be."""
  max_bytes: int = 10 * 2 ** 20
  max_pixels: int = 4096 * 4096
  image_root: str | None = None
  allow_remote: bool = False
  remote_timeout: float = 10.0  # seconds for the whole fetch of a remote image (connect, headers, body, redirects)

  @property
  def max_base64_chars(self) -> int:
    """The longest base64 text of a data: URL accepted (`max_bytes` as base64: 4 characters per 3 bytes)."""
    return self.max_bytes * 4 // 3 + 4


@dataclasses.dataclass
class Prompt:
  """tokens: prompt ids (image spans expanded); images: uint8[S, S, 3] in span order; sizes: each image's
  original (width, height); raw_text: the prompt as text."""
  tokens: list[int]
  images: list[np.ndarray]
  sizes: list[tuple[int, int]]
  raw_text: str


def _read_url(url: str, policy: ImagePolicy) -> bytes:
  if url.startswith("data:"):
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
      raise RequestError("a data: image URL must be data:<mime>;base64,<data>", code="invalid_image_url")
    if len(payload) > policy.max_base64_chars:
      raise RequestError(f"image over the limit of {policy.max_bytes} bytes", code="image_too_large")
    try:
      return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
      raise RequestError(f"the data: image URL is not valid base64 ({e})", code="invalid_image_url") from None
  if url.startswith(("http://", "https://")):
    if not policy.allow_remote:
      raise RequestError("remote image URLs are disabled on this server (start it with --allow_remote_images), "
                         "send the image as a data: URL", code="invalid_image_url")
    try:
      return remote_fetch.fetch(url, max_bytes=policy.max_bytes, timeout=policy.remote_timeout)  # nosec: opt-in flag
    except remote_fetch.TooLargeError:
      raise RequestError(f"image over the limit of {policy.max_bytes} bytes", code="image_too_large") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, 404, timeout, malformed URL or reply
      raise RequestError(f"the image URL cannot be fetched ({e})", code="invalid_image_url") from None
  path = url[len("file://"):] if url.startswith("file://") else url
  if not policy.image_root:
    raise RequestError("local image paths need a server started with --image_root", code="invalid_image_url")
  root = os.path.realpath(policy.image_root)
  try:
    full = os.path.realpath(os.path.join(root, path))
  except ValueError:  # a NUL byte or a lone surrogate: no file has that name
    raise RequestError(f"image path {path!r} is not a valid file name", code="invalid_image_url") from None
  if os.path.commonpath([root, full]) != root:
    raise RequestError(f"image path {path!r} is outside the server's image root", code="invalid_image_url")
  if not os.path.isfile(full):
    raise RequestError(f"image {path!r} does not exist under the server's image root", code="invalid_image_url")
  if os.path.getsize(full) > policy.max_bytes:
    raise RequestError(f"image over the limit of {policy.max_bytes} bytes", code="image_too_large")
  with open(full, "rb") as f:
    return f.read()


def load_image(url: str, policy: ImagePolicy, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8[S, S, 3], original (width, height)) of an image URL; RequestError on any problem."""
  if not isinstance(url, str) or not url:
    raise RequestError("image_url.url must be a non-empty string", code="invalid_image_url")
  data = _read_url(url, policy)
  if len(data) > policy.max_bytes:
    raise RequestError(f"image over the limit of {policy.max_bytes} bytes", code="image_too_large")
  try:
    with Image.open(io.BytesIO(data)) as probe:  # reads the header only: the size is known before decoding
      width, height = probe.size
  except (OSError, Image.DecompressionBombError, ValueError) as e:
    raise RequestError(f"the image cannot be read as an image ({type(e).__name__})", code="invalid_image") from None
  if width * height > policy.max_pixels:
    raise RequestError(f"image of {width}x{height} pixels is over the limit of {policy.max_pixels} pixels",
                       code="image_too_large")
  try:
    return image_lib.preprocess_image(data, image_size), (width, height)
  except (image_lib.ImageError, OSError, ValueError) as e:
    raise RequestError(f"the image cannot be decoded: {e}", code="invalid_image") from None


def _parts(content, where: str, images: list, policy: ImagePolicy, image_size: int,
           where_role: str = "user") -> str:
  """A message's content as the reference's tagged text; its images appended to `images`."""
  if isinstance(content, str):
    items = [{"text": content}]
  elif isinstance(content, list) and content:
    items = []
    for i, part in enumerate(content):
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        items.append({"text": part["text"]})
      elif kind == "refusal" and where_role == "assistant" and isinstance(part.get("refusal"), str):
        items.append({"text": part["refusal"]})  # an earlier answer that declined: its text is the history
      elif kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        array, size = load_image(url, policy, image_size)
        items.append({"image": _KEY.format(len(images))})
        images.append((array, size))
      else:
        raise RequestError(f"{where}.content[{i}] must be {{'type': 'text', 'text': str}} or "
                           "{'type': 'image_url', 'image_url': {'url': str}}", param=f"{where}.content")
  else:
    raise RequestError(f"{where}.content must be a string or a non-empty list of parts", param=f"{where}.content")
  for item in items:
    if "text" in item and ("<img>" in item["text"] or "</img>" in item["text"]):
      raise RequestError(f"{where}: text may not hold <img> tags; send images as image_url parts",
                         param=f"{where}.content")
  return qtext.from_list_format(items)


def _system_text(content, where: str) -> str:
  """A system message's text: a string, or a list of text parts (joined); images have no place there."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and content and all(
      isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise RequestError(f"{where}.content must be a string or a list of text parts (a system message takes no images)",
                     param=f"{where}.content")


def build_prompt(messages, tok: qtext.Tokenizer, *, image_tokens: int, image_size: int, policy: ImagePolicy,
                 max_images: int, chat_format: str = "chatml", default_system: str = qtext.DEFAULT_SYSTEM,
                 max_window_size: int = qtext.DEFAULT_MAX_WINDOW_SIZE, context: int | None = None) -> Prompt:
  """The prompt of an OpenAI `messages` list (see the module docstring). RequestError on a bad request, and on
  text that cannot fit `context` tokens, found from its length before it is tokenized."""
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages must be a non-empty list", param="messages")
  images: list[tuple[np.ndarray, tuple[int, int]]] = []
  system = default_system
  turns: list[tuple[str, str]] = []  # (role, text)
  num_images = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
  if num_images > max_images:
    raise RequestError(f"{num_images} images in the conversation; this server takes at most {max_images}",
                       code="too_many_images", param="messages")
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("system", "developer", "user", "assistant"):
      raise RequestError(f"{where}.role must be 'system', 'user' or 'assistant'", param=f"{where}.role")
    if role in ("system", "developer"):  # OpenAI's newer name for the system message
      if i != 0:
        raise RequestError("a system message must come first", param=where)
      system = _system_text(message.get("content"), where)
      if chat_format == "raw" and system:
        raise RequestError("this model uses the raw (base model) format, which has no system message: send the "
                           "instruction in the user message", param=where)
      continue
    turns.append((role, _parts(message.get("content"), where, images, policy, image_size, role)))
  if not turns or turns[-1][0] != "user":
    raise RequestError("the last message must be from the user", param="messages")
  history: list[tuple[str, str | None]] = []
  for role, text in turns[:-1]:
    if role == "user":
      history.append((text, None))
    elif history and history[-1][1] is None:
      history[-1] = (history[-1][0], text)
    else:
      raise RequestError("an assistant message must follow a user message", param="messages")
  if chat_format == "raw" and history:
    raise RequestError("this model uses the raw (base model) format: send one user message", param="messages")
  # The system and last user messages are always in the prompt (earlier turns may be left out of the window).
  # Tokenizing tens of MB takes half a minute of a worker thread: text whose length alone says it cannot fit is
  # refused first. (An image's tag here is ~20 characters for its 258 tokens: it only adds to the bound's slack.)
  chars = (len(system) if chat_format != "raw" else 0) + len(turns[-1][1])
  if context is not None and (least := qtext.min_tokens(tok, chars)) >= context:
    raise RequestError(f"the system and last user messages hold {chars} characters, at least {least} tokens; the "
                       f"context is {context} tokens", code="context_length_exceeded", param="messages")
  try:
    context = qtext.make_context(tok, turns[-1][1], history, system=system, max_window_size=max_window_size,
                                 chat_format=chat_format, n_image_tokens=image_tokens)
  except ValueError as e:
    raise RequestError(f"the conversation cannot be encoded: {e}", param="messages") from None
  kept = []
  for path in context.image_paths:
    if not path.startswith("upload:") or not path[len("upload:"):].isdigit() or int(path[7:]) >= len(images):
      raise RequestError("text may not hold <img> tags; send images as image_url parts", param="messages")
    kept.append(images[int(path[len("upload:"):])])
  return Prompt(context.tokens, [a for a, _ in kept], [s for _, s in kept], context.raw_text)


def build_raw_prompt(prompt, tok: qtext.Tokenizer, *, image_tokens: int, image_size: int, policy: ImagePolicy,
                     max_images: int, context: int | None = None) -> Prompt:
  """The prompt of a `/v1/completions` request: its text as it is (no chat template, as vLLM's completions), each
  `<img>SOURCE</img>` span an image read as an `image_url` part's URL is (a `data:` URL, a path under the image
  root, or http(s) when allowed): the base model's own prompts, e.g. `<img>...</img>Generate the caption in
  English:` or `<img>...</img><ref>the dog</ref>` (QWENVL_RECIPES' evaluation prompts). RequestError on a bad
  request."""
  if not isinstance(prompt, str) or not prompt:
    raise RequestError("prompt must be a non-empty string, a list of token ids, or a list of either",
                       param="prompt")
  sources = qtext.IMAGE_SPAN.findall(prompt)
  if len(sources) > max_images:
    raise RequestError(f"{len(sources)} images in the prompt; this server takes at most {max_images}",
                       code="too_many_images", param="prompt")
  if prompt.count("<img>") != len(sources) or prompt.count("</img>") != len(sources):
    raise RequestError("prompt: every <img> needs its </img>, with the image's URL or path between them",
                       param="prompt")
  chars = len(qtext.IMAGE_SPAN.sub("<img></img>", prompt))  # an image's source (a data: URL) is not its tokens
  if context is not None and (least := qtext.min_tokens(tok, chars)) >= context:
    raise RequestError(f"the prompt's text holds {chars} characters, at least {least} tokens; the context is "
                       f"{context} tokens", code="context_length_exceeded", param="prompt")
  images = [load_image(src.strip(), policy, image_size) for src in sources]
  keys = iter(range(len(images)))
  text = qtext.IMAGE_SPAN.sub(lambda _: "<img>" + _KEY.format(next(keys)) + "</img>", prompt)
  try:
    made = qtext.make_context(tok, text, [], chat_format="raw", n_image_tokens=image_tokens)
  except ValueError as e:
    raise RequestError(f"the prompt cannot be encoded: {e}", param="prompt") from None
  return Prompt(made.tokens, [a for a, _ in images], [size for _, size in images], prompt)


def json_body(raw: bytes) -> dict:
  """A request body as a JSON object, its null fields dropped (a field sent as null counts as absent, as in
  OpenAI's API); RequestError on anything else."""
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(f"the body is not valid JSON ({e})") from None
  except RecursionError:  # e.g. 100,000 nested brackets: valid JSON that Python's parser cannot take
    raise RequestError("the body is JSON nested too deeply") from None
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object")
  return {k: v for k, v in body.items() if v is not None}


def check_model(model, served: str) -> None:
  """404 (OpenAI's `model_not_found`) unless `model` is None (not given) or the served model's name."""
  if model is not None and model != served:
    raise RequestError(f"model {model!r} does not exist; this server serves {served!r}", status=404,
                       code="model_not_found", param="model")


def check_token_ids(ids, vocab_size: int, *, param: str) -> list[int]:
  """`ids` when it is a list of integer token ids in [0, vocab_size), else RequestError naming `param`."""
  if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
    raise RequestError(f"{param} must be a list of integer token ids", param=param)
  bad = next((t for t in ids if not 0 <= t < vocab_size), None)
  if bad is not None:
    raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)
  return ids


def is_token_prompt(prompt) -> bool:
  """Whether a `/v1/completions` prompt is token ids (OpenAI's list of integers) rather than text."""
  return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt)


def build_token_prompt(ids, tok: qtext.Tokenizer, *, context: int | None = None) -> Prompt:
  """The prompt of a `/v1/completions` request given as token ids (what lm-evaluation-harness sends): taken as
  they are, each in [0, vocabulary). They cannot carry an image (its `<img>`, `<imgpad>` and `</img>` ids have no
  picture behind them): such a prompt is sent as text with an `<img>SOURCE</img>` span. RequestError on a bad
  request."""
  if not is_token_prompt(ids):
    raise RequestError("a token prompt must be a non-empty list of integer token ids", param="prompt")
  if context is not None and len(ids) >= context:
    raise RequestError(f"the prompt has {len(ids)} tokens; the context is {context}",
                       code="context_length_exceeded", param="prompt")
  check_token_ids(ids, tok.vocab_size, param="prompt")
  special = tok.special_tokens
  images = {special[name] for name in (qtext.IMG_START, qtext.IMG_END, qtext.IMG_PAD) if name in special}
  if images.intersection(ids):
    raise RequestError("a token prompt cannot hold an image (the <img>, <imgpad> and </img> ids have no picture "
                       "behind them): send it as text with an <img>SOURCE</img> span", param="prompt")
  return Prompt(list(ids), [], [], tok.decode(ids))


def boxes_in_pixels(answer: str, prompt: Prompt) -> list[dict]:
  """The answer's `<ref>…</ref><box>…</box>` boxes, each in the [0, 1000) grid and in pixels of the latest image
  of the conversation (the reference's `draw_bbox_on_latest_picture` convention: int(v / 1000 * size)). Malformed
  boxes are skipped; no image, no pixel boxes.

  Each box carries the phrase it belongs to (`ref`): the ref right before it, as the reference's
  `_fetch_all_box_with_ref`, and also, where the reference gives none, the ref of the box right before it (one
  phrase, several boxes: `<ref>two cats</ref><box>…</box><box>…</box>`) or, for an answer that starts with a box,
  the `<ref>…</ref>` the prompt ends with (the grounding prompt of a base model: `<ref>the red square</ref>`; with
  the evaluation's `<box>` after it, the answer is the box's inside and closing tag)."""
  out = []
  lead = _TRAILING_REF.search(prompt.raw_text)
  prefix = lead.group(0) if lead else ""
  for item in qtext.parse_boxes(prefix + answer, strict=False, chain_refs=True):
    entry = {"ref": item.ref, "box_1000": list(item.box)}
    if prompt.sizes:
      w, h = prompt.sizes[-1]
      entry["box"] = list(qtext.denormalize_box(item.box, w, h, convention="draw"))
      entry["image_index"] = len(prompt.sizes) - 1
    out.append(entry)
  return out


# The prompt's last phrase, and the `<box>` the official RefCOCO prompt (`<img>…</img><ref>{sent}</ref><box>`) ends
# with: the answer continues it with "(x1,y1),(x2,y2)</box>".
_TRAILING_REF = re.compile(r"<ref>[^<]*</ref>(?:<box>)?$")


def as_list(value, name: str, *, max_items: int = 4, max_chars: int = 256) -> Sequence[str]:
  """`stop`: a string or a list of up to 4 non-empty strings of up to `max_chars` characters each (the streaming
  detokenizer compares prefixes of each with the answer's tail at every token, on the event loop: four stop strings
  of megabytes cost ~2 ms a token there, seconds of an answer during which no other stream is served)."""
  if value is None:
    return ()
  items = [value] if isinstance(value, str) else value
  if not isinstance(items, list) or len(items) > max_items or not all(isinstance(s, str) and s for s in items):
    raise RequestError(f"{name} must be a non-empty string or a list of up to {max_items} of them", param=name)
  if any(len(s) > max_chars for s in items):
    raise RequestError(f"{name}: a stop string may have at most {max_chars} characters", param=name)
  return tuple(items)
