"""What inference jobs load: a model config matched to the tokenizer (the tokenizer spec: tests/text/test_spec.py)."""
import pytest

from qwenvl_jax import errors
from qwenvl_jax.inference import loading
from qwenvl_jax.text import QwenTokenizer


def test_model_config_follows_the_tokenizer(sp_tok, qwen_tiktoken_path):
  cfg = loading.model_config("tiny", sp_tok, dtype="float32")
  assert cfg.image_pad_id == sp_tok.img_pad_id and cfg.llm.vocab_size == 1024
  assert (cfg.remat_policy, cfg.dtype, cfg.param_dtype) == ("none", "float32", "float32")
  qwen = QwenTokenizer(qwen_tiktoken_path)
  # Random weights grow the vocabulary to cover the tokenizer (a multiple of 128); a checkpoint keeps its own.
  grown = loading.model_config("tiny", qwen, random_weights=True, image_size=56)
  assert grown.llm.vocab_size == 151936 and grown.image_pad_id == 151859
  assert grown.llm.vocab_size >= qwen.vocab_size and grown.llm.vocab_size % 128 == 0
  assert grown.vision.image_size == 56
  # A tiny checkpoint cannot read the Qwen vocabulary: said as a tokenizer that does not match the weights (it
  # used to say "image_pad_id 151859 is outside the vocabulary of 1024").
  with pytest.raises(errors.ConfigError, match="the tokenizer has 151860 tokens but the tiny model's vocabulary has "
                     "1024: it is not the tokenizer these weights were trained with"):
    loading.model_config("tiny", qwen)
