"""Chat on top of `decode.Generator`: ChatML (or raw) prompts with history, images, stop words, streaming.

This is the reference's `model.chat` / `model.chat_stream` (RECIPES §4, SPEC §4.3–4.5): the prompt comes from
`text.make_context` (history newest-first within `max_window_size`, every image of the history re-encoded on
every call), generation stops on the chat format's stop words (chatml: `<|im_end|>`/`<|im_start|>` force
`<|endoftext|>`; raw: `Human:`), and the answer is `text.decode_tokens` of the new ids. Images are read from the
paths inside `<img>…</img>` and preprocessed with the data pipeline's PIL function (`data.images`).

Streaming yields the text as it grows, holding back a trailing partial UTF-8 character, and stops showing text at
the first stop token (as the reference's streamer, which decodes up to the stop).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from qwenvl_jax import errors
from qwenvl_jax import text as qtext
from qwenvl_jax.data import images as image_lib
from qwenvl_jax.inference import decode

History = list[tuple[str, str]]


def chat_generation_config(tok: qtext.Tokenizer, chat_format: str = "chatml", **overrides) -> decode.GenerationConfig:
  """The reference's chat decoding settings for `tok`: its stop words, eos = pad = `<|endoftext|>`, no id past
  the tokenizer's vocabulary; `overrides` set any other `GenerationConfig` field (e.g. Qwen-VL-Chat's
  `do_sample=True, top_p=0.3`)."""
  fields = dict(eos_id=tok.eod_id, pad_id=tok.eod_id, vocab_limit=tok.vocab_size,
                stop_words=tuple(tuple(s) for s in qtext.get_stop_words_ids(chat_format, tok)))
  known = [f.name for f in dataclasses.fields(decode.GenerationConfig)]
  for name in overrides:
    if name not in known:  # a typo was a bare TypeError ("unexpected keyword argument")
      close = errors.closest(name, known)
      raise errors.ConfigError(f"chat_generation_config: {name!r} is not a GenerationConfig field"
                               + (f"; did you mean {', '.join(close)}?" if close else ""),
                               hint=f"the fields: {', '.join(known)}")
  fields.update(overrides)
  return decode.GenerationConfig(**fields)


def conversation_context(tok: qtext.Tokenizer, query: str, history: History, *, system: str, max_window_size: int,
                         chat_format: str, n_image_tokens: int) -> qtext.WindowedContext:
  """`text.windowed_context` (the prompt, and how many of the oldest turns the window leaves out), with a
  conversation that cannot be encoded (an unclosed `<img>`, an `<imgpad>` in the text) as one ConfigError."""
  try:
    return qtext.windowed_context(tok, query, history, system=system, max_window_size=max_window_size,
                                  chat_format=chat_format, n_image_tokens=n_image_tokens)
  except ValueError as e:  # the text's image tags (typed, hand-edited or generated): one line, as the server's
    tags = any(word in str(e) for word in ("<img>", "image", "unclosed"))  # not: a chat_format, a history's shape
    raise errors.ConfigError(f"the conversation cannot be encoded: {e}",
                             hint="<img>PATH</img> names a picture and may not appear otherwise" if tags
                             else None) from None


def load_images(paths: Sequence[str], image_size: int, image_root: str | None = None) -> list[np.ndarray]:
  """uint8[S, S, 3] of every path (relative paths are taken under `image_root` when given)."""
  out = []
  for path in paths:
    if image_root and not os.path.isabs(path):
      path = os.path.join(image_root, path)
    out.append(image_lib.preprocess_image(path, image_size))
  return out


def _check_generator_and_tokenizer(generator, tok) -> None:
  """One line for the likely mix-ups (the model or `qwenvl_jax.load`'s result for the Generator, a spec string for
  the tokenizer), which otherwise fail as an AttributeError deep in the prompt building or decoding."""
  if not isinstance(generator, decode.Generator):
    raise errors.ConfigError(f"chat takes a Generator as its first argument, got {type(generator).__name__}",
                             hint="gen = qwenvl_jax.Generator(loaded.model), then chat(gen, loaded.tokenizer, ...)")
  if not all(hasattr(tok, a) for a in ("encode", "decode", "eod_id")):
    raise errors.ConfigError(f"chat takes a tokenizer as its second argument, got {type(tok).__name__} {tok!r:.60}",
                             hint="loaded.tokenizer, or qwenvl_jax.load_tokenizer(SPEC)")


@dataclasses.dataclass
class Prompt:
  """A tokenized prompt with its images. context: the `text.ChatContext`; images: uint8[S, S, 3] each;
  dropped_turns: how many of the oldest history turns did not fit `max_window_size` and are not in the prompt."""
  context: qtext.ChatContext
  images: list[np.ndarray]
  dropped_turns: int = 0


def build_prompt(generator: decode.Generator, tok: qtext.Tokenizer, query: str,
                 history: Sequence[tuple[str, str]] | None = None, *, system: str = qtext.DEFAULT_SYSTEM,
                 chat_format: str = "chatml", max_window_size: int = qtext.DEFAULT_MAX_WINDOW_SIZE,
                 image_root: str | None = None) -> Prompt:
  """Tokenizes `query` with its history and loads the images it names.

  Raises ValueError when a token id does not exist in the model (tokenizer and model do not match), ConfigError
  when the query, history or system message cannot be encoded (an unclosed `<img>`, an `<imgpad>` in the text).
  """
  _check_generator_and_tokenizer(generator, tok)
  cfg = generator.cfg
  context, dropped = conversation_context(tok, query, history, system=system, max_window_size=max_window_size,
                                          chat_format=chat_format, n_image_tokens=cfg.image_tokens)
  too_big = [t for t in context.tokens if t >= cfg.llm.vocab_size]
  if too_big:
    raise ValueError(f"the prompt holds token id {too_big[0]} but the model has only {cfg.llm.vocab_size} "
                     "embedding rows: the tokenizer does not belong to this model")
  images = load_images(context.image_paths, cfg.vision.image_size, image_root)
  return Prompt(context, images, dropped)


def _prompt_batch(generator: decode.Generator, tok: qtext.Tokenizer, prompt: Prompt) -> decode.PromptBatch:
  return decode.make_prompt_batch([prompt.context.tokens], [prompt.images] if prompt.images else None,
                                  pad_id=tok.eod_id, image_pad_id=generator.cfg.image_pad_id,
                                  image_tokens=generator.cfg.image_tokens)


def _visible_ids(ids: Sequence[int], tok: qtext.Tokenizer, chat_format: str) -> list[int]:
  """The generated ids that are shown: up to the first stop token of the format."""
  stops = {tok.eod_id} | ({tok.im_start_id, tok.im_end_id} if chat_format == "chatml" else set())
  for i, t in enumerate(ids):
    if t in stops:
      return list(ids[:i])
  return list(ids)


class ChatReply:
  """A streamed answer. Iterate for text deltas; afterwards `response` holds the final answer (stripped, as the
  reference's `decode_tokens`), `new_tokens` the generated ids and `history` the updated history."""

  def __init__(self, generator: decode.Generator, tok: qtext.Tokenizer, query: str, history: History,
               prompt: Prompt, gen: decode.GenerationConfig, key: jax.Array, chat_format: str):
    self._generator, self._tok, self._prompt, self._gen, self._key = generator, tok, prompt, gen, key
    self._query, self._old_history, self._chat_format = query, history, chat_format
    self.dropped_turns = prompt.dropped_turns  # oldest history turns not in the prompt (past max_window_size)
    self.new_tokens: list[int] = []
    self.response: str | None = None
    self.history: History | None = None

  def __iter__(self) -> Iterator[str]:
    shown = ""
    batch = _prompt_batch(self._generator, self._tok, self._prompt)
    for step in self._generator.stream(batch, self._gen, self._key):
      self.new_tokens.append(int(step[0]))
      if int(step[0]) == self._gen.eos_id:
        break
      text = self._tok.decode(_visible_ids(self.new_tokens, self._tok, self._chat_format))
      text = text.rstrip("\ufffd")  # a multi-byte character still being generated
      if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
        shown = text
    # The end: what was held back is final now (a truncated character stays a replacement character).
    text = self._tok.decode(_visible_ids(self.new_tokens, self._tok, self._chat_format))
    if text.startswith(shown) and len(text) > len(shown):
      yield text[len(shown):]
    self._finish()

  def _finish(self):
    ctx = self._prompt.context.tokens
    self.response = qtext.decode_tokens(ctx + self.new_tokens, self._tok, context_length=len(ctx),
                                        chat_format=self._chat_format)
    self.history = list(self._old_history) + [(self._query, self.response)]

  def consume(self) -> str:
    """Runs the generation to its end without streaming; returns the response."""
    for _ in self:
      pass
    return self.response


def chat_stream(generator: decode.Generator, tok: qtext.Tokenizer, query: str,
                history: Sequence[tuple[str, str]] | None = None, *, system: str = qtext.DEFAULT_SYSTEM,
                chat_format: str = "chatml", gen: decode.GenerationConfig | None = None,
                key: jax.Array | None = None, image_root: str | None = None,
                max_window_size: int = qtext.DEFAULT_MAX_WINDOW_SIZE) -> ChatReply:
  """Starts a streamed answer to `query` (see `ChatReply`).

  Args:
    generator: `Generator(loaded.model)`; tok: `loaded.tokenizer`.
    query: the user message; images as `<img>PATH</img>` (`text.from_list_format` builds it from a list).
    history: (query, response) pairs of the earlier turns, oldest first (chatml only).
    system: the system message (chatml only).
    chat_format: "chatml" (a chat model) or "raw" (a base model: the query alone); pass `loaded.chat_format`.
    gen: a `GenerationConfig`, default `chat_generation_config(tok, chat_format)` (greedy, up to 512 tokens;
      e.g. `chat_generation_config(tok, chat_format, max_new_tokens=64, do_sample=True, top_p=0.3)`).
    key: a `jax.random.key(seed)` for sampling (default key 0).
    image_root: the folder relative image paths are read under (default: the current folder).
    max_window_size: the token budget of system + history (older turns are dropped first).
  """
  if isinstance(history, (str, bytes, dict)):
    raise errors.ConfigError(f"history must be a list of (query, response) pairs, got a {type(history).__name__}",
                             hint="the history a previous chat() returned, or [] to start")
  history = list(history or [])
  if chat_format == "raw" and (history or system != qtext.DEFAULT_SYSTEM):
    # make_context's raw format encodes the query alone: the turns and system message would be dropped unseen.
    raise errors.ConfigError("history and system need the chatml format: chat_format='raw' (a base model) has no "
                             "turns and no system message",
                             hint="a chat-tuned model with chat_format='chatml', or one query at a time")
  if gen is not None and not isinstance(gen, decode.GenerationConfig):
    raise errors.ConfigError(f"gen must be a GenerationConfig, got {type(gen).__name__}",
                             hint="gen=qwenvl_jax.inference.chat_generation_config(tok, chat_format, "
                             "max_new_tokens=...)")
  if key is not None and not isinstance(key, jax.Array):
    raise errors.ConfigError(f"key must be a JAX random key, got {type(key).__name__} {key!r:.40}",
                             hint="key=jax.random.key(seed)")
  prompt = build_prompt(generator, tok, query, history, system=system, chat_format=chat_format,
                        max_window_size=max_window_size, image_root=image_root)
  gen = gen or chat_generation_config(tok, chat_format)
  return ChatReply(generator, tok, query, history, prompt, gen, jax.random.key(0) if key is None else key,
                   chat_format)


def chat(generator: decode.Generator, tok: qtext.Tokenizer, query: str,
         history: Sequence[tuple[str, str]] | None = None, **kwargs) -> tuple[str, History]:
  """The reference's `model.chat`: returns (response, history + [(query, response)]).

  `kwargs` are `chat_stream`'s (system, chat_format, gen, key, image_root, max_window_size); pass
  `chat_format=loaded.chat_format` for a model from `qwenvl_jax.load`, and `gen=` to change the length or sampling.
  """
  reply = chat_stream(generator, tok, query, history, **kwargs)
  reply.consume()
  return reply.response, reply.history
