"""Helpers of the data tests: a tiny byte-level tokenizer and hand-written expected texts.

The pipeline only needs the `Tokenizer` protocol of DESIGN §3; a byte tokenizer (id = byte value, specials after
255) makes every test independent of vocabulary files and trivially decodable, so expected texts are written
by hand rather than copied from the code under test.
"""
import json
import re

import numpy as np
from PIL import Image

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

  @property
  def max_token_chars(self) -> int:
    return max(map(len, SPECIALS))

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


def expand_images(text: str, image_tokens: int) -> str:
  """The text with every `<img></img>` span written as the model sees it (hand-written, SPEC §3.4)."""
  return text.replace("<img></img>", "<img>" + "<imgpad>" * image_tokens + "</img>")


def expected_raw_text(turns, image_tokens: int) -> str:
  """Stage 1/2: prompt + answer + <|endoftext|>."""
  return expand_images("".join(t for _, t in turns), image_tokens) + "<|endoftext|>"


def expected_raw_supervised(turns) -> str:
  """Stage 1/2 supervised targets: the answer and the closing <|endoftext|>. Without a prompt, the first token
  (one character for the byte tokenizer) has nothing before it to be predicted from."""
  answer = turns[1][1] if turns[0][1] else turns[1][1][1:]
  return answer + "<|endoftext|>"


def expected_chatml_text(turns, image_tokens: int, system: str = "You are a helpful assistant.") -> str:
  """Stage 3 (SPEC §4.3): the ChatML text of system + turns."""
  parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
  parts += [f"<|im_start|>{role}\n{expand_images(t, image_tokens)}<|im_end|>\n" for role, t in turns]
  return "".join(parts)


def expected_chatml_supervised(turns) -> str:
  """Stage 3 supervised targets (SPEC §6.2): every <|im_start|> but the very first token, every <|im_end|> and
  the "\\n" after it, and the assistant contents."""
  parts = ["<|im_end|>\n"]
  parts += [f"<|im_start|>{t if role == 'assistant' else ''}<|im_end|>\n" for role, t in turns]
  return "".join(parts)


def write_image_text_jsonl(folder, n: int, *, size=(20, 30)):
  """n <= 25 solid-colour images (image i has red value 10 * i) and a JSONL of pairs "image number i"; returns the
  path."""
  (folder / "imgs").mkdir(exist_ok=True)
  path = folder / "pairs.jsonl"
  with open(path, "w") as f:
    for i in range(n):
      pixels = np.zeros(size + (3,), np.uint8)
      pixels[..., 0] = 10 * i
      Image.fromarray(pixels).save(folder / "imgs" / f"{i}.png")
      f.write(json.dumps({"id": f"pair{i}", "image": f"imgs/{i}.png", "text": f"image number {i}"}) + "\n")
  return path
