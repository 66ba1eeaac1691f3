"""A SentencePiece tokenizer with the Qwen special-token surface, for models trained from scratch.

`SentencePieceTokenizer` implements the same `Tokenizer` protocol as `QwenTokenizer`: the same surface forms for
every special token the project uses (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<ref>` … `<imgpad>`), the same
`encode`/`decode` semantics (NFC first, specials allowed by default, never BOS/EOS, exact round trips), the same id
attributes. Only the id values differ (they are small: the specials come right after `<unk>` = 0).

`train_sentencepiece` trains such a model from an in-memory list of texts in a few seconds. The model it writes:
  id 0                  <unk> (never produced: byte fallback covers every character)
  ids 1 … 12            the 12 specials, in the order <|endoftext|> <|im_start|> <|im_end|> <ref> </ref> <box>
                        </box> <quad> </quad> <img> </img> <imgpad> (user-defined symbols)
  then                  `<|extra_0|>` … `<|extra_{k-1}|>` when `num_extra_tokens=k` (default 0: Qwen-VL never uses
                        them, so a small model does not pay for 205 dead rows), then "\\n" (ChatML uses it between
                        every turn), then the 256 byte pieces <0x00> … <0xFF>, then the learned pieces.
Normalization is off inside SentencePiece (identity rule, no dummy prefix, whitespace kept) so that, with byte
fallback, `decode(encode(text)) == NFC(text)` for every string, as with tiktoken.
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from qwenvl_jax import errors
from qwenvl_jax.text import tokenizer as qtok

# The specials every SentencePiece model of this project must define, in id order.
REQUIRED_SPECIALS = (qtok.ENDOFTEXT, qtok.IM_START, qtok.IM_END) + qtok.IMAGE_ST
# SentencePiece's whitespace meta symbol: a literal one in text must not decode as a space.
_META = "\u2581"


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int = 1000, *,
                        model_type: str = "bpe", num_extra_tokens: int = 0, overwrite: bool = False,
                        num_threads: int = 2) -> str:
  """Trains a SentencePiece model with the project's special tokens; returns the `.model` path.

  Args:
    texts: training sentences (e.g. the synthetic dataset's captions). They are NFC-normalized; special-token
      surface forms inside them are fine.
    model_prefix: writes `{model_prefix}.model` and `{model_prefix}.vocab`.
    vocab_size: upper bound on the vocabulary size. A corpus too small to fill it gives a smaller vocabulary
      (soft limit) rather than an error; it must at least hold <unk>, the specials, "\\n" and the 256 bytes.
    model_type: "bpe" or "unigram".
    num_extra_tokens: how many `<|extra_N|>` reserve tokens to define (Qwen has 205; default 0).
    overwrite: replace existing output files (otherwise existing files are an error).
    num_threads: trainer threads.
  """
  model_prefix = os.fspath(model_prefix)
  outputs = [model_prefix + ".model", model_prefix + ".vocab"]
  existing = [p for p in outputs if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True to replace it")
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  if num_extra_tokens < 0:
    raise ValueError(f"num_extra_tokens must be >= 0, got {num_extra_tokens}")
  symbols = list(REQUIRED_SPECIALS) + [f"<|extra_{i}|>" for i in range(num_extra_tokens)] + ["\n"]
  minimum = 1 + len(symbols) + 256
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size={vocab_size} is too small: <unk>, {len(symbols)} special symbols and 256 byte "
                     f"pieces already take {minimum} ids")
  sentences = [unicodedata.normalize("NFC", t) for t in texts]
  sentences = [t for t in sentences if t]
  if not sentences:
    raise ValueError("train_sentencepiece got no non-empty training text")
  directory = os.path.dirname(model_prefix)
  if directory:
    os.makedirs(directory, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      model_type=model_type,
      user_defined_symbols=symbols,
      byte_fallback=True,
      character_coverage=1.0,
      # Identity normalization and literal whitespace keep encode/decode an exact round trip.
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      # Single digits, like Qwen's pre-tokenizer, so numbers (box coordinates) tokenize uniformly.
      split_digits=True,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
      max_sentence_length=1 << 16,
      num_threads=num_threads,
      minloglevel=2,
  )
  return outputs[0]


class SentencePieceTokenizer:
  """A `Tokenizer` over a SentencePiece model trained by `train_sentencepiece` (or any model that defines the
  twelve special surface forms as user-defined symbols and has byte fallback)."""

  def __init__(self, model_path: str | os.PathLike):
    self.path = os.fspath(model_path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"SentencePiece model {self.path!r} does not exist")
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise errors.InputFormatError(f"corrupt SentencePiece model {self.path!r}: {e}") from None
    n = self._sp.GetPieceSize()
    specials = {}
    for i in range(n):
      if self._sp.IsControl(i) or self._sp.IsUnknown(i) or self._sp.IsByte(i):
        continue
      piece = self._sp.IdToPiece(i)
      if piece in REQUIRED_SPECIALS or re.fullmatch(r"<\|extra_\d+\|>", piece):
        specials[piece] = i
    missing = [s for s in REQUIRED_SPECIALS if s not in specials]
    if missing:
      raise ValueError(f"SentencePiece model {self.path!r} lacks the special tokens {missing} "
                       "(train it with train_sentencepiece)")
    if self._sp.PieceToId("<0x00>") == self._sp.unk_id() or not self._sp.IsByte(self._sp.PieceToId("<0x00>")):
      raise ValueError(f"SentencePiece model {self.path!r} has no byte fallback; some text would not round-trip")
    self._special_tokens = specials
    self._special_ids = frozenset(specials.values())
    self._byte_ids = [self._sp.PieceToId(f"<0x{b:02X}>") for b in range(256)]
    # A piece stands for its own characters (the whitespace symbol for one space; this project's models keep every
    # character: identity normalization, whitespace kept), a byte piece for at most one.
    self._max_token_chars = max(1, max(len(self._sp.IdToPiece(i)) for i in range(n)
                                       if not (self._sp.IsByte(i) or self._sp.IsControl(i) or self._sp.IsUnknown(i))))
    for attr, surface in qtok.ID_ATTRIBUTES.items():
      setattr(self, attr, specials[surface])
    # Longest first so that no surface form shadows a longer one sharing its prefix.
    self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def special_tokens(self) -> dict[str, int]:
    return dict(self._special_tokens)

  @property
  def max_token_chars(self) -> int:
    return self._max_token_chars

  def encode(self, text: str, *, allowed_special: qtok.AllowedSpecial = "all",
             disallowed_special: qtok.AllowedSpecial = ()) -> list[int]:
    """NFC, then SentencePiece; same special-token semantics as `QwenTokenizer.encode`.

    SentencePiece itself always matches user-defined symbols, so a surface form that is not allowed is encoded
    as its UTF-8 byte pieces: it decodes back to the same text but is not the special id.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", _replace_lone_surrogates(text))
    allowed = self._resolve(allowed_special)
    # tiktoken's rule: "all" disallows every special that is not allowed; an explicit set wins over allowed.
    disallowed = self._resolve(disallowed_special) - (allowed if disallowed_special == "all" else set())
    ids: list[int] = []
    pos = 0
    for m in self._special_re.finditer(text):
      surface = m.group()
      if surface in disallowed:
        raise ValueError(f"encountered the disallowed special token {surface!r} at character {m.start()}")
      ids.extend(self._encode_plain(text[pos:m.start()]))
      if surface in allowed:
        ids.append(self._special_tokens[surface])
      else:
        ids.extend(self._byte_ids[b] for b in surface.encode("utf-8"))
      pos = m.end()
    ids.extend(self._encode_plain(text[pos:]))
    return ids

  def encode_batch(self, texts: Sequence[str], *, allowed_special: qtok.AllowedSpecial = "all",
                   num_threads: int = 8) -> list[list[int]]:
    """`encode` of each text (sequential: SentencePiece is fast enough for the small models it serves)."""
    del num_threads
    return [self.encode(t, allowed_special=allowed_special) for t in texts]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
    """Decodes ids; invalid UTF-8 from byte pieces follows `errors`. Raises ValueError on an unknown id."""
    ids = qtok.check_ids(ids, self.vocab_size)
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special_ids]
    # Decode piece by piece to bytes so byte-fallback sequences that are not valid UTF-8 follow `errors`.
    out = bytearray()
    for i in ids:
      if self._sp.IsByte(i):
        out.append(int(self._sp.IdToPiece(i)[3:5], 16))
      elif i in self._special_ids:
        out += self._sp.IdToPiece(i).encode("utf-8")
      elif self._sp.IsUnknown(i) or self._sp.IsControl(i):
        continue
      else:
        out += self._sp.IdToPiece(i).replace(_META, " ").encode("utf-8")
    return out.decode("utf-8", errors=errors)

  def _encode_plain(self, text: str) -> list[int]:
    ids: list[int] = []
    for k, chunk in enumerate(text.split(_META)):
      if k:
        ids.extend(self._byte_ids[b] for b in _META.encode("utf-8"))
      if chunk:
        ids.extend(self._sp.EncodeAsIds(chunk))
    return ids

  def _resolve(self, special: qtok.AllowedSpecial) -> set[str]:
    if special == "all":
      return set(self._special_tokens)
    if isinstance(special, str):
      raise TypeError(f"special tokens must be 'all' or a collection of surface forms, got the string {special!r}")
    return set(special)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _replace_lone_surrogates(text: str) -> str:
  """`text` with each lone UTF-16 surrogate as U+FFFD and surrogate pairs joined: exactly what tiktoken (hence
  `QwenTokenizer` and the reference) does to such text, where SentencePiece's C++ binding raises a bare
  RuntimeError. Python decodes invalid UTF-8 in argv to surrogates, so a prompt can hold them."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
  return text
