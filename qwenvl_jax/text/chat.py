"""ChatML prompt construction, stop words and answer decoding (the reference `qwen_generation_utils`, SPEC §4.3–4.4).

`make_context` builds, with every piece tokenized separately (Gotcha 18: `"\\n\\n"` is one token when tokenized
jointly, two when the pieces are separate),

  [im_start] enc("system") enc("\\n") enc(system) [im_end]
  ( enc("\\n") [im_start] enc("user") enc("\\n") enc(q_i) [im_end]
    enc("\\n") [im_start] enc("assistant") enc("\\n") enc(r_i) [im_end] )*              history, oldest first
  enc("\\n") [im_start] enc("user") enc("\\n") enc(query) [im_end] enc("\\n") [im_start] enc("assistant") enc("\\n")

Role names and contents are encoded with only the nine image/box tags allowed (so `<|im_start|>` typed by a user
stays text); `"\\n"` and the final `"assistant"` with all specials allowed, as the reference. History turns are
taken newest-first while `len(system) + len(turn) + len(kept) < max_window_size` (image spans count); the first
turn that does not fit and every older one are dropped (a turn whose length in characters alone says it cannot
fit, `tokenizer.min_tokens`, is dropped without being tokenized). The current query is always kept.

Images: each `<img>PATH</img>` becomes `<img>` + Q x `<imgpad>` + `</img>` (see `formatting.encode_with_images`),
and the paths come back in token order so the caller can load them.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

from qwenvl_jax.text import formatting
from qwenvl_jax.text import tokenizer as qtok

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144
# Qwen-VL-Chat's sampling defaults (its generation_config.json, SPEC §4.5): nucleus 0.3, no top-k filter.
CHAT_TOP_P = 0.3
CHAT_TOP_K = 0
CHAT_FORMATS = ("chatml", "raw")


class ChatContext(NamedTuple):
  """A prompt ready for prefill.

  raw_text: the prompt as text (image tags hold the paths), exactly the reference's `raw_text`.
  tokens: int ids, image spans expanded.
  image_paths: path of each image span of `tokens`, in order.
  """
  raw_text: str
  tokens: list[int]
  image_paths: list[str]


class WindowedContext(NamedTuple):
  """`make_context`'s prompt and how many of the oldest history turns did not fit `max_window_size` (left out)."""
  context: ChatContext
  dropped_turns: int


def make_context(tok: qtok.Tokenizer, query: str, history: Sequence[tuple[str, str | None]] | None = None,
                 system: str = DEFAULT_SYSTEM, max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
                 chat_format: str = "chatml", *, n_image_tokens: int = formatting.IMAGE_TOKENS) -> ChatContext:
  """The reference `make_context` (see the module docstring), with images kept in the data pipeline.

  Args:
    tok: any `Tokenizer`.
    query: the new user message (may hold `<img>PATH</img>`, `<ref>`, `<box>` tags, e.g. from
      `from_list_format`).
    history: (query, response) pairs, oldest first; a None response closes the turn after the user message.
    system: the system message. Default "You are a helpful assistant." (the default of the reference's
      `model.chat`; the bare `make_context` function defaults to "").
    max_window_size: token budget for system + history (the query is not counted against it).
    chat_format: "chatml" (chat models) or "raw" (base models: the query is encoded as is).
    n_image_tokens: slots per image span (256 for Qwen-VL).
  Returns:
    `ChatContext(raw_text, tokens, image_paths)`. NOTE: the reference returns `(raw_text, tokens)`; here a third
    field carries the image paths because images are not encoded into the ids.
  """
  return windowed_context(tok, query, history, system, max_window_size, chat_format,
                          n_image_tokens=n_image_tokens).context


def windowed_context(tok: qtok.Tokenizer, query: str, history: Sequence[tuple[str, str | None]] | None = None,
                     system: str = DEFAULT_SYSTEM, max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
                     chat_format: str = "chatml", *, n_image_tokens: int = formatting.IMAGE_TOKENS
                     ) -> WindowedContext:
  """`make_context` (same arguments), also counting the oldest history turns it left out (0 for "raw")."""
  if chat_format not in CHAT_FORMATS:
    raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")
  if not isinstance(query, str):
    raise TypeError(f"query must be a str, got {type(query).__name__}")
  if chat_format == "raw":
    encoded = formatting.encode_with_images(tok, query, n_image_tokens=n_image_tokens)
    return WindowedContext(ChatContext(query, encoded.ids, encoded.image_paths), 0)

  history = list(history or [])
  for i, turn in enumerate(history):
    if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and isinstance(turn[0], str)
            and (turn[1] is None or isinstance(turn[1], str))):
      raise ValueError(f"history[{i}] must be a (query: str, response: str | None) pair, got {turn!r}")

  im_start, im_end = [tok.im_start_id], [tok.im_end_id]
  nl = tok.encode("\n")

  def piece(role: str, content: str) -> tuple[str, list[int], list[str]]:
    # The reference's _tokenize_str: role and content encoded separately, only image/box tags allowed.
    encoded = formatting.encode_with_images(tok, content, allowed_special=qtok.IMAGE_ST,
                                            n_image_tokens=n_image_tokens)
    ids = tok.encode(role, allowed_special=qtok.IMAGE_ST) + nl + encoded.ids
    return f"{role}\n{content}", ids, encoded.image_paths

  system_text, system_ids, system_paths = piece("system", system)
  system_tokens = im_start + system_ids + im_end

  raw_text = ""
  context_tokens: list[int] = []
  context_paths: list[str] = []
  kept = 0
  for turn_query, turn_response in reversed(history):
    room = max_window_size - len(system_tokens) - len(context_tokens)
    if qtok.min_tokens(tok, _text_chars(turn_query) + _text_chars(turn_response or "")) >= room:
      break  # it cannot fit: dropped without tokenizing it (a turn of tens of MB took half a minute)
    query_text, query_ids, query_paths = piece("user", turn_query)
    query_tokens = im_start + query_ids + im_end
    if turn_response is not None:
      response_text, response_ids, response_paths = piece("assistant", turn_response)
      response_tokens = im_start + response_ids + im_end
      next_tokens = nl + query_tokens + nl + response_tokens
      next_text = f"\n{qtok.IM_START}{query_text}{qtok.IM_END}\n{qtok.IM_START}{response_text}{qtok.IM_END}"
      next_paths = query_paths + response_paths
    else:
      next_tokens = nl + query_tokens + nl
      next_text = f"\n{qtok.IM_START}{query_text}{qtok.IM_END}\n"
      next_paths = query_paths
    if len(system_tokens) + len(next_tokens) + len(context_tokens) < max_window_size:
      context_tokens = next_tokens + context_tokens
      raw_text = next_text + raw_text
      context_paths = next_paths + context_paths
      kept += 1
    else:
      break

  _, query_ids, query_paths = piece("user", query)
  tokens = (system_tokens + context_tokens + nl + im_start + query_ids + im_end + nl + im_start
            + tok.encode("assistant") + nl)
  raw_text = (f"{qtok.IM_START}{system_text}{qtok.IM_END}" + raw_text
              + f"\n{qtok.IM_START}user\n{query}{qtok.IM_END}\n{qtok.IM_START}assistant\n")
  return WindowedContext(ChatContext(raw_text, tokens, system_paths + context_paths + query_paths),
                         len(history) - kept)


def chat_template(system: str = DEFAULT_SYSTEM) -> str:
  """A Jinja chat template, in Hugging Face's convention (`messages`, `add_generation_prompt`), that renders an
  OpenAI messages list of text to `make_context`'s `raw_text` with `system` as the default system message.

  The reference builds its prompt in Python (`make_context`) and its tokenizer has no template; vLLM's
  `/tokenizer_info` hands a template to clients such as lm-evaluation-harness's `RemoteTokenizer`, which render it
  and tokenize the text as one. That text is `raw_text`, but tokenized
  jointly (Gotcha 18) it gives `make_context`'s tokens only where no message starts with a line break and no
  two user messages follow each other (`"\n\n"` is one token then); turns are never left out of a window; and
  `<|im_start|>` typed in a message becomes the special token. Image parts, and a system message after the first,
  are errors (`raise_exception`, which Hugging Face defines; elsewhere the call itself fails)."""
  literal = json.dumps(system, ensure_ascii=False)  # a Jinja string literal: the same escapes as JSON's
  return (
      "{%- macro text(content) -%}"
      "{%- if content is string -%}{{ content }}"
      "{%- else -%}{%- for part in content -%}"
      "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
      "{%- elif part['type'] == 'refusal' -%}{{ part['refusal'] }}"
      "{%- else -%}{{ raise_exception('this chat template renders text only; send images to "
      "/v1/chat/completions') }}"
      "{%- endif -%}{%- endfor -%}{%- endif -%}"
      "{%- endmacro -%}"
      "{%- if messages[0]['role'] in ('system', 'developer') -%}"
      "{%- set system = text(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
      "{%- else -%}"
      "{%- set system = " + literal + " -%}{%- set turns = messages -%}"
      "{%- endif -%}"
      "{{ '<|im_start|>system\\n' }}{{ system }}{{ '<|im_end|>' }}"
      "{%- for m in turns -%}"
      "{%- if m['role'] in ('system', 'developer') -%}"
      "{{ raise_exception('a system message must come first') }}"
      "{%- endif -%}"
      "{{ '\\n<|im_start|>' }}{{ m['role'] }}{{ '\\n' }}{{ text(m['content']) }}{{ '<|im_end|>' }}"
      "{%- if m['role'] == 'user' and loop.nextitem is defined and loop.nextitem['role'] == 'user' -%}"
      "{{ '\\n' }}"
      "{%- endif -%}"
      "{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}")


def _text_chars(text: str) -> int:
  """`len(text)` less the paths of its `<img>PATH</img>` tags: an image span has its fixed number of tokens, however
  long its path."""
  chars, end = len(text), 0
  while (start := text.find(qtok.IMG_START, end)) >= 0 and (end := text.find(qtok.IMG_END, start)) >= 0:
    chars -= end - start - len(qtok.IMG_START)
  return chars


def get_stop_words_ids(chat_format: str, tok: qtok.Tokenizer) -> list[list[int]]:
  """Token sequences that end generation: chatml `[[im_end], [im_start]]`; raw `[enc("Human:"), [eod]]`.

  On a match the reference forces `<|endoftext|>` next (logit 2**15) and generation stops on it.
  """
  if chat_format == "chatml":
    return [[tok.im_end_id], [tok.im_start_id]]
  if chat_format == "raw":
    return [tok.encode("Human:"), [tok.eod_id]]
  raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")


def decode_tokens(tokens: Sequence[int], tok: qtok.Tokenizer, *, context_length: int, chat_format: str = "chatml",
                  errors: str = "replace", return_end_reason: bool = False) -> str | tuple[str, str]:
  """The answer text of `tokens` = context (`context_length` ids) + generated ids.

  chatml: the generated ids up to the first `<|im_start|>`, `<|im_end|>` or `<|endoftext|>`, decoded and
    stripped. raw: the generated ids decoded, cut at the first `<|endoftext|>`, stripped; special tags such as
    `<ref>`/`<box>` are kept (the grounding output).
  Differences from the reference (both only where the reference is accidental): the reference decodes the
  whole sequence and slices off `len(raw_text)` characters, which here is replaced by decoding only the ids
  after the context (image spans make the decoded context differ from `raw_text`); and when chatml generation
  ends on the length limit the reference drops the last generated token, which is kept here.
  With `return_end_reason`, also returns "Gen length N" or "Gen '<|im_end|>'" like the reference.
  """
  if chat_format not in CHAT_FORMATS:
    raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")
  tokens = qtok.check_ids(tokens, tok.vocab_size)
  if not 0 <= context_length <= len(tokens):
    raise ValueError(f"context_length {context_length} is outside [0, {len(tokens)}]")
  generated = tokens[context_length:]
  end_reason = f"Gen length {len(tokens)}"
  if chat_format == "chatml":
    stops = (tok.im_start_id, tok.im_end_id, tok.eod_id)
    for i, t in enumerate(generated):
      if t in stops:
        end_reason = f"Gen {tok.decode([t])!r}"
        generated = generated[:i]
        break
    text = tok.decode(generated, errors=errors).strip()
  else:
    text = tok.decode(generated, errors=errors)
    if qtok.ENDOFTEXT in text:
      end_reason = f"Gen {qtok.ENDOFTEXT!r}"
      text = text.split(qtok.ENDOFTEXT)[0]
    text = text.strip()
  return (text, end_reason) if return_end_reason else text
