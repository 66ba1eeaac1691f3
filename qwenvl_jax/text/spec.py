"""The one tokenizer spec every entry point accepts (train, evaluate, generate, serve): a string naming a file.

  qwen:PATH             the Qwen vocabulary (`qwen.tiktoken`) -> `QwenTokenizer`
  sentencepiece:PATH    a SentencePiece model -> `SentencePieceTokenizer`
  PATH                  the same, chosen by the file's extension: `.tiktoken` or `.model`

(The trainer also accepts '' for the synthetic dataset's SentencePiece model, which it trains in its workdir; that
is a training job, not a spec, so it stays in `training.experiment`.)
"""
from __future__ import annotations

import os

from qwenvl_jax import errors
from qwenvl_jax.text.sentencepiece_tokenizer import SentencePieceTokenizer
from qwenvl_jax.text.tokenizer import QwenTokenizer, Tokenizer

_KINDS = {"qwen": QwenTokenizer, "sentencepiece": SentencePieceTokenizer}
_EXTENSIONS = {".tiktoken": "qwen", ".model": "sentencepiece"}


def parse_tokenizer_spec(spec: str | os.PathLike) -> tuple[str, str]:
  """('qwen' | 'sentencepiece', path) of a spec; the file is not opened.

  Raises:
    ValueError: an empty spec, or a bare path whose extension names no tokenizer kind.
  """
  spec = os.fspath(spec)
  kind, sep, path = spec.partition(":")
  if sep and kind in _KINDS:
    if not path:
      raise errors.ConfigError(f"tokenizer spec {spec!r} names no file after '{kind}:'")
    return kind, path
  if not spec:
    raise errors.ConfigError("empty tokenizer spec: expected qwen:PATH, sentencepiece:PATH or a .tiktoken / "
                             ".model file")
  ext = os.path.splitext(spec)[1]
  if ext not in _EXTENSIONS:
    raise errors.ConfigError(f"unknown tokenizer {spec!r}: expected qwen:PATH, sentencepiece:PATH, or a file ending in "
                     f".tiktoken (Qwen) or .model (SentencePiece)")
  return _EXTENSIONS[ext], spec


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
  """The tokenizer a spec names (see the module docstring).

  Raises:
    ValueError: a malformed spec. FileNotFoundError: the file does not exist. errors.InputFormatError (a
    ValueError): the file is not a vocabulary of that kind (a corrupt `.tiktoken`, a SentencePiece model named as
    `qwen:`, ...).
  """
  kind, path = parse_tokenizer_spec(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
  try:
    return _KINDS[kind](path)
  except errors.UserError:
    raise
  except (ValueError, RuntimeError) as e:  # tiktoken files: ValueError naming the line; SentencePiece: RuntimeError
    raise errors.InputFormatError(
        f"tokenizer {path!r} is not a {kind} vocabulary: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
        hint="a qwen.tiktoken file takes qwen:PATH, a SentencePiece .model file sentencepiece:PATH") from e
