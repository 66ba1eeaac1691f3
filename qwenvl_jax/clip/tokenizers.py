"""The text tokenizers of CLIP checkpoints, through Hugging Face's `tokenizers` (Rust) reading the checkpoint's files.

Letters: B texts, T padded length.

* "clip": byte-level BPE with the `</w>` end-of-word suffix, lower-cased, whitespace runs collapsed, NFC; the
  pre-tokenizer splits with OpenAI CLIP's pattern (`'s|'t|...|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`). Each text
  becomes <|startoftext|> tokens <|endoftext|>, truncated to the context (77 ids, BOS and EOS included: at most 75
  text tokens, as transformers' CLIPTokenizer with `truncation=True, max_length=77` and OpenAI's
  `clip.tokenize(..., truncate=True)`). Files: `tokenizer.json`, else `vocab.json` + `merges.txt`.
* "chinese_clip": BERT WordPiece (BertNormalizer: clean text, spaces around CJK characters, lower case per
  `do_lower_case`, accents stripped when lower-casing; BertPreTokenizer; `##` continuations), [CLS] tokens [SEP],
  truncated to the context (52 ids in the reference). Files: `tokenizer.json`, else `vocab.txt`.

The library does the tokenizing; this module only assembles its pipeline from the checkpoint's files when there is
no `tokenizer.json` (older CLIP and all Chinese-CLIP releases ship only vocabulary files) and pads batches.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from qwenvl_jax.clip.config import CheckpointError

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's `SimpleTokenizer.pat` (the special tokens are matched first so they stay whole).
CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
              r"[^\s\p{L}\p{N}]+")
BERT_CLS, BERT_SEP, BERT_PAD, BERT_UNK = "[CLS]", "[SEP]", "[PAD]", "[UNK]"


class TextTokenizer:
  """Texts -> padded id batches for one checkpoint's text tower.

  Attributes:
    max_len: the context T_max: every encoding is truncated to it, special tokens included.
    pad_id: id written after the end of each text (masked out, or unseen by a causal tower).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, max_len: int, pad_id: int, description: str):
    self._tok = tokenizer
    self._tok.no_padding()
    # The post-processor's special tokens count against max_length, so the text keeps max_len - 2 tokens.
    self._tok.enable_truncation(max_length=max_len)
    self.max_len = max_len
    self.pad_id = pad_id
    self.description = description

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """The ids of each text, special tokens included, at most `max_len` each."""
    return [e.ids for e in self._tok.encode_batch(list(texts))]

  def pad(self, encoded: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[B, length], mask bool[B, length]) with each row's ids first, then `pad_id`."""
    ids = np.full((len(encoded), length), self.pad_id, np.int32)
    mask = np.zeros((len(encoded), length), np.bool_)
    for row, e in enumerate(encoded):
      if len(e) > length:
        raise ValueError(f"an encoding of {len(e)} ids does not fit a length of {length}")
      ids[row, :len(e)] = e
      mask[row, :len(e)] = True
    return ids, mask

  def __repr__(self) -> str:
    return f"TextTokenizer({self.description}, max_len={self.max_len})"


def _token_id(tok: tokenizers.Tokenizer, token: str, where: str) -> int:
  token_id = tok.token_to_id(token)
  if token_id is None:
    raise CheckpointError(f"{where}: the vocabulary has no {token!r} token")
  return token_id


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not readable JSON: {e}") from e


def clip_bpe(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
  """CLIP's BPE pipeline built from `vocab.json` + `merges.txt` (what `tokenizer.json` holds for newer releases)."""
  vocab = _read_json(vocab_path)
  with open(merges_path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  # merges.txt starts with a "#version" line; every other non-empty line is one merge "a b".
  merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
  if any(len(m) != 2 for m in merges):
    raise CheckpointError(f"{merges_path} has lines that are not a pair of tokens")
  tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                 fuse_unk=False, unk_token=CLIP_EOS))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  where = os.path.dirname(vocab_path)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{CLIP_BOS} $A {CLIP_EOS}",
      special_tokens=[(CLIP_BOS, _token_id(tok, CLIP_BOS, where)), (CLIP_EOS, _token_id(tok, CLIP_EOS, where))])
  return tok


def bert_wordpiece(vocab_path: str, lowercase: bool = True) -> tokenizers.Tokenizer:
  """BERT's WordPiece pipeline built from `vocab.txt` (one token per line, id = line number)."""
  with open(vocab_path, encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  if BERT_UNK not in vocab:
    raise CheckpointError(f"{vocab_path}: the vocabulary has no {BERT_UNK!r} token")
  tok = tokenizers.Tokenizer(WordPiece(vocab, unk_token=BERT_UNK))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                              lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  where = os.path.dirname(vocab_path)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BERT_CLS} $A {BERT_SEP}",
      special_tokens=[(BERT_CLS, _token_id(tok, BERT_CLS, where)), (BERT_SEP, _token_id(tok, BERT_SEP, where))])
  return tok


def load_tokenizer(directory: str | os.PathLike, family: str, max_len: int) -> TextTokenizer:
  """The tokenizer of a CLIP checkpoint folder.

  Args:
    directory: the checkpoint folder (transformers' save_pretrained layout).
    family: "clip" or "chinese_clip".
    max_len: the context, special tokens included (77 for CLIP, 52 for Chinese-CLIP).

  Raises:
    CheckpointError: the tokenizer files are missing or unreadable, or lack the family's special tokens.
  """
  d = os.fspath(directory)
  path = lambda name: os.path.join(d, name)  # noqa: E731
  config = _read_json(path("tokenizer_config.json")) if os.path.isfile(path("tokenizer_config.json")) else {}
  if os.path.isfile(path("tokenizer.json")):
    try:
      tok = tokenizers.Tokenizer.from_file(path("tokenizer.json"))
    except Exception as e:  # the Rust library raises plain Exception for a malformed file
      raise CheckpointError(f"{path('tokenizer.json')} is not a tokenizers file: {e}") from e
    source = "tokenizer.json"
  elif family == "clip" and os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
    tok, source = clip_bpe(path("vocab.json"), path("merges.txt")), "vocab.json + merges.txt"
  elif family == "chinese_clip" and os.path.isfile(path("vocab.txt")):
    tok, source = bert_wordpiece(path("vocab.txt"), bool(config.get("do_lower_case", True))), "vocab.txt"
  else:
    wanted = "vocab.json + merges.txt" if family == "clip" else "vocab.txt"
    raise CheckpointError(f"{d} has no tokenizer: looked for tokenizer.json or {wanted}")
  if family == "clip":
    first, last = _token_id(tok, CLIP_BOS, d), _token_id(tok, CLIP_EOS, d)
    pad_id = last
  else:
    first, last = _token_id(tok, BERT_CLS, d), _token_id(tok, BERT_SEP, d)
    pad_id = _token_id(tok, BERT_PAD, d) if tok.token_to_id(BERT_PAD) is not None else 0
  out = TextTokenizer(tok, max_len=max_len, pad_id=pad_id, description=f"{family} from {d}/{source}")
  # The text towers pool at these tokens, so a tokenizer.json without the post-processor that adds them is unusable.
  probe = out.encode(["a"])[0]
  if probe[0] != first or probe[-1] != last:
    raise CheckpointError(f"{d}/{source} does not wrap texts in the family's start and end tokens (got {probe})")
  return out
