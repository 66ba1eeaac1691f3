"""Shared fixtures of the inference tests: a tiny SentencePiece tokenizer and one tiny float32 model (built once
per session: model construction is the slow part on a 2-core CPU)."""
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.inference import Generator
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.text import SentencePieceTokenizer, train_sentencepiece


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory) -> str:
  return train_sentencepiece(synthetic_corpus(300), tmp_path_factory.mktemp("sp") / "tiny", vocab_size=400)


@pytest.fixture(scope="session")
def sp_tok(sp_model_file) -> SentencePieceTokenizer:
  return SentencePieceTokenizer(sp_model_file)


@pytest.fixture(scope="session")
def tiny_model(sp_tok) -> QwenVL:
  """float32 so cached and recomputed logits agree to rounding; `<imgpad>` is the tokenizer's."""
  return QwenVL(tiny(dtype="float32", remat_policy="none", image_pad_id=sp_tok.img_pad_id), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def generator(tiny_model) -> Generator:
  return Generator(tiny_model)


@pytest.fixture(scope="session")
def image_prompt(sp_tok, tiny_model):
  """(ids, image uint8[S, S, 3]): text, one image span of Q `<imgpad>`, more text."""
  q = tiny_model.cfg.image_tokens
  ids = (sp_tok.encode("Picture 1:") + [sp_tok.img_start_id] + [sp_tok.img_pad_id] * q + [sp_tok.img_end_id]
         + sp_tok.encode("What colour is the circle? Answer:"))
  s = tiny_model.cfg.vision.image_size
  image = np.random.default_rng(3).integers(0, 256, (s, s, 3), dtype=np.uint8)
  return ids, image
