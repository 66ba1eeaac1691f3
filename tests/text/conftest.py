"""Fixtures of the text tests: the real Qwen tokenizer (skips without the vocabulary) and a tiny SentencePiece one."""
import random

import pytest

from qwenvl_jax.text import QwenTokenizer
from qwenvl_jax.text import SentencePieceTokenizer
from qwenvl_jax.text import train_sentencepiece


def _tiny_corpus(n: int = 2000, seed: int = 0) -> list[str]:
  """Short synthetic captions with digits, Chinese and ChatML-like text."""
  rng = random.Random(seed)
  colours = ["red", "blue", "green", "yellow", "purple", "红色", "蓝色"]
  shapes = ["circle", "square", "triangle", "star", "圆", "方块"]
  out = []
  for _ in range(n):
    out.append(f"a {rng.choice(colours)} {rng.choice(shapes)} at ({rng.randrange(1000)},{rng.randrange(1000)}), "
               f"next to a {rng.choice(colours)} {rng.choice(shapes)}.")
  return out


@pytest.fixture(scope="session")
def tiny_corpus():
  """`tiny_corpus(n, seed)` → n short synthetic sentences."""
  return _tiny_corpus


@pytest.fixture(scope="session")
def qwen_tok(qwen_tiktoken_path) -> QwenTokenizer:
  return QwenTokenizer(qwen_tiktoken_path)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
  return train_sentencepiece(_tiny_corpus(), tmp_path_factory.mktemp("sp") / "tiny", vocab_size=500)


@pytest.fixture(scope="session")
def sp_tok(sp_model_path) -> SentencePieceTokenizer:
  return SentencePieceTokenizer(sp_model_path)


@pytest.fixture(scope="session", params=["sentencepiece", "qwen"])
def any_tok(request):
  """Each test using it runs with both backends (the Qwen one skips without the vocabulary)."""
  return request.getfixturevalue("sp_tok" if request.param == "sentencepiece" else "qwen_tok")
