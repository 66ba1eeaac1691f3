"""Fixtures of the data tests: a tiny byte-level tokenizer with the project's special-token surface.

The pipeline only needs the `Tokenizer` protocol of DESIGN §3; a byte tokenizer (id = byte value, specials after
255) makes every test independent of vocabulary files and trivially decodable, so expected texts are written
by hand rather than copied from the code under test.
"""
import re

import pytest

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ref>", "</ref>", "<box>", "</box>", "<quad>",
            "</quad>", "<img>", "</img>", "<imgpad>")
_ATTRS = ("eod_id", "im_start_id", "im_end_id", "ref_start_id", "ref_end_id", "box_start_id", "box_end_id",
          "quad_start_id", "quad_end_id", "img_start_id", "img_end_id", "img_pad_id")


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, the 12 specials as 256..267."""

  def __init__(self):
    self.special_tokens = {s: 256 + i for i, s in enumerate(SPECIALS)}
    for attr, s in zip(_ATTRS, SPECIALS):
      setattr(self, attr, self.special_tokens[s])
    self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
    self._inverse = {v: k for k, v in self.special_tokens.items()}

  @property
  def vocab_size(self) -> int:
    return 256 + len(SPECIALS)

  def encode(self, text, *, allowed_special="all", disallowed_special=()):
    ids = []
    for piece in self._split.split(text):
      allowed = allowed_special == "all" or piece in allowed_special
      if piece in self.special_tokens and allowed:
        ids.append(self.special_tokens[piece])
      else:
        ids += list(piece.encode("utf-8"))
    return ids

  def decode(self, ids, *, skip_special_tokens=False, errors="replace"):
    out, buf = [], []
    for i in ids:
      i = int(i)
      if i < 256:
        buf.append(i)
        continue
      out.append(bytes(buf).decode("utf-8", errors))
      buf = []
      if not skip_special_tokens:
        out.append(self._inverse[i])
    out.append(bytes(buf).decode("utf-8", errors))
    return "".join(out)


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
  return ByteTokenizer()
