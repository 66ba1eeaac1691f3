"""Incremental detokenization for streaming, with OpenAI `stop` strings.

Each new token re-decodes the request's ids (decoding pieces one by one would split multi-byte characters and
break SentencePiece's leading-space rule); what is new is sent, except
  * a trailing U+FFFD: a multi-byte character still being generated (as `inference.chat.ChatReply`);
  * a trailing piece that could be the start of a stop string: it is held until it is not, or until the stop
    string completes, in which case the text is cut before it and the request ends (OpenAI: the stop sequence is
    not returned). With `min_tokens` (vLLM's), a stop string ends the text only once that many tokens were
    generated: one that ends earlier is text as any other (vLLM checks the text each token adds from then on).
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
  """Feed token ids with `add`; it returns the text to send now. `text` is everything sent; `stopped` says a
  stop string was met (then nothing more is returned); min_tokens: no stop string ends the text before that many
  tokens were fed."""

  def __init__(self, decode, stop: Sequence[str] = (), min_tokens: int = 0):
    self._decode = decode
    self._stop = tuple(stop)
    self._min_tokens = min_tokens
    self._free_from = 0  # a stop string must end past this many characters (those decoded before min_tokens)
    self._ids: list[int] = []
    self.text = ""
    self.stopped = False

  def _held_back(self, full: str) -> int:
    """How many trailing characters of `full` could begin a stop string."""
    held = 0
    for s in self._stop:
      for n in range(min(len(s) - 1, len(full)), 0, -1):
        if full.endswith(s[:n]):
          held = max(held, n)
          break
    return held

  @property
  def num_tokens(self) -> int:
    """Tokens fed so far."""
    return len(self._ids)

  def add(self, token_id: int) -> str:
    if self.stopped:
      return ""
    self._ids.append(int(token_id))
    return self._emit(self._decode(self._ids).rstrip("\ufffd"), final=False)

  def finish(self) -> str:
    """The end of generation: whatever was held back is final now."""
    if self.stopped:
      return ""
    return self._emit(self._decode(self._ids), final=True)

  def _emit(self, full: str, final: bool) -> str:
    if len(self._ids) < self._min_tokens:
      hits = []
      self._free_from = len(full)
    else:
      hits = [full.find(s, max(0, len(self.text) - len(s), self._free_from - len(s) + 1)) for s in self._stop]
      hits = [h for h in hits if h >= 0]
    if hits:
      self.stopped = True
      end = min(hits)
    else:
      end = len(full) if final else len(full) - self._held_back(full)
    if not full.startswith(self.text) or end <= len(self.text):
      return ""
    delta = full[len(self.text):end]
    self.text += delta
    return delta


def token_piece(decode, token_id: int) -> tuple[str, bytes]:
  """One token's (text, UTF-8 bytes), as OpenAI's log-probability entries show it: a token holding part of a
  multi-byte character has U+FFFD in its text and its real bytes in `bytes`, so the bytes of consecutive tokens join
  to the text. `decode(ids, errors=...)` is the tokenizer's."""
  raw = decode([token_id], errors="surrogateescape").encode("utf-8", "surrogateescape")
  return raw.decode("utf-8", "replace"), raw
