"""The Qwen tokenizer on tiktoken, reproducing the reference `tokenization_qwen.py` (SPEC §3.1, §4.1).

The vocabulary file `qwen.tiktoken` holds one `base64(token_bytes) rank` line per byte-level BPE token
(151643 ranks, 0 … 151642). The special tokens follow in a fixed order (SPEC §3.1, Gotcha 17):

  151643            <|endoftext|>   end of document, also the pad token
  151644 / 151645   <|im_start|> / <|im_end|>   ChatML
  151646 … 151850   <|extra_0|> … <|extra_204|>  unused reserve, never renamed
  151851 … 151859   <ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>

so the tokenizer defines 151860 ids (the model's embedding has 151936 rows; the extra rows are padding).

Encoding matches the reference exactly: NFC normalization first, the Qwen pre-tokenizer regex (with single-digit
`\\p{N}`, unlike cl100k's `\\p{N}{1,3}`), special tokens allowed by default, never a BOS or EOS. `encode` does NOT
expand `<img>PATH</img>` into the 258-position image span: that is `formatting.encode_with_images`, which also
returns the image paths the data pipeline loads.

This module also defines the `Tokenizer` protocol that `QwenTokenizer` and `SentencePieceTokenizer` implement.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import tiktoken

# The reference's pre-tokenizer (tokenization_qwen.PAT_STR), verbatim.
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"

NUM_EXTRA_TOKENS = 205
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS))
# The reference's IMAGE_ST, in its order: these nine are appended after the extras.
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_ST
assert all(t.startswith("<") for t in SPECIAL_TOKENS)  # QwenTokenizer.encode's fast path relies on it

NUM_BPE_RANKS = 151643
EOD_ID = NUM_BPE_RANKS                        # 151643
IM_START_ID = EOD_ID + 1                      # 151644
IM_END_ID = EOD_ID + 2                        # 151645
REF_START_ID = EOD_ID + 3 + NUM_EXTRA_TOKENS  # 151851
REF_END_ID = REF_START_ID + 1                 # 151852
BOX_START_ID = REF_START_ID + 2               # 151853
BOX_END_ID = REF_START_ID + 3                 # 151854
QUAD_START_ID = REF_START_ID + 4              # 151855
QUAD_END_ID = REF_START_ID + 5                # 151856
IMG_START_ID = REF_START_ID + 6               # 151857
IMG_END_ID = REF_START_ID + 7                 # 151858
IMG_PAD_ID = REF_START_ID + 8                 # 151859
VOCAB_SIZE = IMG_PAD_ID + 1                   # 151860

# Attribute names every tokenizer exposes, with the surface form each one is the id of.
ID_ATTRIBUTES = {
    "eod_id": ENDOFTEXT, "im_start_id": IM_START, "im_end_id": IM_END,
    "ref_start_id": REF_START, "ref_end_id": REF_END, "box_start_id": BOX_START, "box_end_id": BOX_END,
    "quad_start_id": QUAD_START, "quad_end_id": QUAD_END,
    "img_start_id": IMG_START, "img_end_id": IMG_END, "img_pad_id": IMG_PAD,
}

AllowedSpecial = Literal["all"] | Collection[str]

# NFC, which `encode` applies first, joins at most this many characters into one: the longest canonical
# decomposition of a character NFC composes is 4 code points (U+1FAF, Greek omega with three marks; a Hangul
# syllable, 3), also 4 as UTF-16 units (a str holding a surrogate pair as two characters, which tiktoken joins).
# Checked against Python's Unicode tables in the tests.
NFC_MAX_COMPOSED = 4


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of the project uses of a tokenizer (DESIGN.md §3)."""

  eod_id: int
  im_start_id: int
  im_end_id: int
  img_start_id: int
  img_end_id: int
  img_pad_id: int
  ref_start_id: int
  ref_end_id: int
  box_start_id: int
  box_end_id: int
  quad_start_id: int
  quad_end_id: int

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer defines (ids are 0 … vocab_size − 1)."""

  @property
  def special_tokens(self) -> dict[str, int]:
    """Surface form → id of every special token."""

  @property
  def max_token_chars(self) -> int:
    """The most characters of (NFC-normalized) text that one token stands for: the bound of `min_tokens`."""

  def encode(self, text: str, *, allowed_special: AllowedSpecial = "all",
             disallowed_special: AllowedSpecial = ()) -> list[int]:
    """NFC-normalizes and encodes `text`; never adds BOS/EOS."""

  def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = "all",
                   num_threads: int = 8) -> list[list[int]]:
    """`encode` of each text."""

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
    """Decodes ids to text; with `skip_special_tokens` every special id is dropped."""


def load_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
  """Reads a `.tiktoken` vocabulary: token bytes → rank, with ranks exactly 0 … N−1.

  Raises FileNotFoundError when `path` is missing and ValueError naming the file and line when it is corrupt
  (a malformed line, bad base64, a duplicated token or rank, or ranks with gaps).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer vocabulary {path!r} does not exist (expected a qwen.tiktoken file)")
  with open(path, "rb") as f:
    contents = f.read()
  ranks: dict[bytes, int] = {}
  seen_ranks: set[int] = set()
  for line_no, line in enumerate(contents.splitlines(), start=1):
    if not line:
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"corrupt vocabulary {path!r}, line {line_no}: expected 'base64 rank', got {line[:80]!r}")
    try:
      token = base64.b64decode(parts[0], validate=True)
      rank = int(parts[1])
    except (binascii.Error, ValueError) as e:
      raise ValueError(f"corrupt vocabulary {path!r}, line {line_no}: {e} in {line[:80]!r}") from None
    if token in ranks or rank in seen_ranks:
      raise ValueError(f"corrupt vocabulary {path!r}, line {line_no}: duplicated token or rank {rank}")
    ranks[token] = rank
    seen_ranks.add(rank)
  if not ranks:
    raise ValueError(f"corrupt vocabulary {path!r}: no tokens")
  if min(seen_ranks) != 0 or max(seen_ranks) != len(ranks) - 1:
    raise ValueError(f"corrupt vocabulary {path!r}: ranks must be 0 … {len(ranks) - 1} without gaps, "
                     f"got {min(seen_ranks)} … {max(seen_ranks)}")
  return ranks


def min_tokens(tok: Tokenizer, chars: int) -> int:
  """At least how many tokens `tok.encode` makes of any text of `chars` characters, known without encoding it
  (tokenizing tens of MB takes half a minute): no token stands for more than `tok.max_token_chars` characters of
  the NFC-normalized text, and NFC joins at most `NFC_MAX_COMPOSED` characters into one."""
  return chars // (tok.max_token_chars * NFC_MAX_COMPOSED)


def check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
  """`ids` as a list of Python ints, or ValueError naming the first id outside [0, vocab_size)."""
  if isinstance(ids, np.ndarray):
    if ids.ndim != 1:
      raise ValueError(f"expected a 1-D sequence of token ids, got an array of shape {ids.shape}")
    ids = ids.tolist()
  out = []
  for i, x in enumerate(ids):
    try:
      x = int(x)
    except (TypeError, ValueError):
      raise ValueError(f"token id at index {i} is not an integer: {x!r}") from None
    if not 0 <= x < vocab_size:
      raise ValueError(f"token id {x} at index {i} is outside the vocabulary [0, {vocab_size})")
    out.append(x)
  return out


class QwenTokenizer:
  """The Qwen / Qwen-VL tokenizer (tiktoken byte-level BPE + 217 special tokens).

  Usage:
    tok = QwenTokenizer("../shared/data/qwen.tiktoken")
    tok.encode("<|im_start|>user\\n你好")   # [151644, 872, 198, 108386]
    tok.decode(ids, skip_special_tokens=True)
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    ranks = load_tiktoken_bpe(self.path)
    if len(ranks) != NUM_BPE_RANKS:
      raise ValueError(f"vocabulary {self.path!r} has {len(ranks)} BPE ranks; the Qwen vocabulary has "
                       f"{NUM_BPE_RANKS} (is this a qwen.tiktoken file?)")
    self._special_tokens = {tok: i for i, tok in enumerate(SPECIAL_TOKENS, start=len(ranks))}
    self._encoding = tiktoken.Encoding(
        "Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self._special_tokens)
    assert self._encoding.n_vocab == VOCAB_SIZE, self._encoding.n_vocab
    for attr, surface in ID_ATTRIBUTES.items():
      setattr(self, attr, self._special_tokens[surface])
    # A byte-level token of k bytes overlaps at most k characters (each at least one of its bytes).
    self._max_token_chars = max(max(map(len, ranks)), max(map(len, self._special_tokens)))
    self._regex_cache: dict[frozenset[str], re.Pattern] = {}

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  @property
  def special_tokens(self) -> dict[str, int]:
    return dict(self._special_tokens)

  @property
  def max_token_chars(self) -> int:
    return self._max_token_chars  # 128 (bytes of the longest BPE token) for qwen.tiktoken

  @property
  def encoding(self) -> tiktoken.Encoding:
    """The underlying tiktoken encoding (inputs must already be NFC-normalized)."""
    return self._encoding

  def encode(self, text: str, *, allowed_special: AllowedSpecial = "all",
             disallowed_special: AllowedSpecial = ()) -> list[int]:
    """Encodes `text` like the reference `tokenize` (without the image-path expansion).

    Args:
      text: any string; it is NFC-normalized first.
      allowed_special: special-token surface forms that become their special id ("all" = every one, the
        reference default). Others are encoded as ordinary text, e.g. `make_context` allows only the nine
        image/box tags so a literal `<|im_start|>` typed by a user stays text.
      disallowed_special: surface forms whose presence raises ValueError (default: none, as the reference);
        "all" means every special that is not allowed (tiktoken's rule).
    Returns:
      int ids, no BOS/EOS.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    allowed, disallowed = _as_set(allowed_special), _as_set(disallowed_special)
    if "<" not in text:
      return self._encoding.encode_ordinary(text)  # every special token starts with "<"
    allowed = set(self._special_tokens) if allowed == "all" else allowed & self._special_tokens.keys()
    # tiktoken's rule: "all" disallows every special that is not allowed; an explicit set wins over allowed.
    disallowed = (set(self._special_tokens) - allowed if disallowed == "all"
                  else disallowed & self._special_tokens.keys())
    if disallowed:
      m = self._special_regex(frozenset(disallowed)).search(text)
      if m:
        raise ValueError(f"encountered the disallowed special token {m.group()!r} at character {m.start()}")
    if not allowed:
      return self._encoding.encode_ordinary(text)
    # tiktoken's own special-token path converts the allowed set for its Rust core on every call, which costs
    # more than encoding a caption; splitting at allowed specials and encoding the pieces ordinarily is what it
    # does internally, so the ids are identical (checked against it in the tests).
    ids: list[int] = []
    pos = 0
    for m in self._special_regex(frozenset(allowed)).finditer(text):
      if m.start() > pos:
        ids += self._encoding.encode_ordinary(text[pos:m.start()])
      ids.append(self._special_tokens[m.group()])
      pos = m.end()
    if pos < len(text):
      ids += self._encoding.encode_ordinary(text[pos:])
    return ids

  def _special_regex(self, surfaces: frozenset[str]) -> re.Pattern:
    pattern = self._regex_cache.get(surfaces)
    if pattern is None:
      pattern = re.compile("|".join(re.escape(t) for t in sorted(surfaces, key=len, reverse=True)))
      if len(self._regex_cache) < 64:
        self._regex_cache[surfaces] = pattern
    return pattern

  def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = "all",
                   num_threads: int = 8) -> list[list[int]]:
    """`encode` of each text, on up to `num_threads` threads (tiktoken releases the GIL while encoding).

    Texts are split into one contiguous chunk per thread: tiktoken's own `encode_batch` submits one task per
    text, whose overhead exceeds the encoding of a short caption.
    """
    texts = list(texts)
    num_threads = max(1, min(num_threads, len(texts) // 64))
    if num_threads == 1:
      return [self.encode(t, allowed_special=allowed_special) for t in texts]
    bounds = [len(texts) * k // num_threads for k in range(num_threads + 1)]
    def run(k: int) -> list[list[int]]:
      return [self.encode(t, allowed_special=allowed_special) for t in texts[bounds[k]:bounds[k + 1]]]
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      return [ids for chunk in pool.map(run, range(num_threads)) for ids in chunk]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
    """Decodes ids; bytes that are not valid UTF-8 follow `errors` ("replace", as the reference).

    With `skip_special_tokens`, every id ≥ 151643 (all specials, the reference rule) is dropped.
    Raises ValueError naming the first id outside the vocabulary.
    """
    ids = check_ids(ids, VOCAB_SIZE)
    if skip_special_tokens:
      ids = [i for i in ids if i < EOD_ID]
    return self._encoding.decode(ids, errors=errors)

  def __repr__(self) -> str:
    return f"QwenTokenizer({self.path!r}, vocab_size={VOCAB_SIZE})"


def _as_set(special: AllowedSpecial) -> Literal["all"] | set[str]:
  if special == "all":
    return "all"
  if isinstance(special, str):
    raise TypeError(f"special tokens must be 'all' or a collection of surface forms, got the string {special!r}")
  return set(special)
