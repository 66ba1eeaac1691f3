"""A run that starts from other weights (`config.init`) with `config.tokenizer=''` uses their vocabulary: the
tokenizer a `params:` checkpoint keeps, the other run's `config.tokenizer`, or a copy of that run's synthetic
tokenizer.model. It used to draw a fresh synthetic vocabulary, so a fine-tune of a converted Qwen-VL without
--config.tokenizer trained the real weights on the wrong token ids without a word."""
import json
import os

import numpy as np
import pytest

from qwenvl_jax import errors
from qwenvl_jax.checkpoint import orbax_store
from qwenvl_jax.data import train_synthetic_tokenizer
from qwenvl_jax.training import experiment, train
from tests.training.helpers import small_config


def _params(path, model_record):
  orbax_store.save_params(path, {"w": np.zeros(2, np.float32)}, custom_metadata={"model": model_record})
  return path


def test_a_params_checkpoint_lends_the_tokenizer_it_keeps(tmp_path):
  ckpt = _params(tmp_path / "ckpt", {"image_size": 56, "tokenizer": "sentencepiece:tok.model"})
  config = small_config(3, tmp_path / "run", init=f"params:{ckpt}")
  inherited = experiment.inherit_tokenizer(config)
  assert inherited.tokenizer == f"sentencepiece:{ckpt / 'tok.model'}"
  assert config.tokenizer == ""  # the caller's config is not changed
  explicit = small_config(3, tmp_path / "run", init=f"params:{ckpt}", tokenizer="qwen:mine.tiktoken")
  assert experiment.inherit_tokenizer(explicit).tokenizer == "qwen:mine.tiktoken"  # an explicit one wins
  assert experiment.inherit_tokenizer(small_config(3, tmp_path / "run")).tokenizer == ""  # no init: synthetic


def test_a_params_checkpoint_without_a_tokenizer_is_refused_before_anything_is_written(tmp_path):
  ckpt = _params(tmp_path / "ckpt", {"image_size": 56})
  config = small_config(3, tmp_path / "run", init=f"params:{ckpt}")
  with pytest.raises(errors.ConfigError, match="keeps no tokenizer") as e:
    train(config)
  assert "--config.tokenizer=qwen:" in e.value.hint
  assert not (tmp_path / "run").exists()


def test_a_trainer_run_lends_its_tokenizer_spec_or_its_own_vocabulary(tmp_path):
  other = tmp_path / "stage1"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"tokenizer": "qwen:/data/qwen.tiktoken"}))
  config = small_config(2, tmp_path / "run", init=f"trainer:{other}")
  assert experiment.inherit_tokenizer(config).tokenizer == "qwen:/data/qwen.tiktoken"
  # A run on the synthetic vocabulary: the new run copies its tokenizer.model (here one of another size and seed
  # than the new config would draw), so both runs tokenize alike.
  (other / "config.json").write_text(json.dumps({"tokenizer": ""}))
  theirs = train_synthetic_tokenizer(os.path.join(tmp_path, "theirs"), vocab_size=700, seed=5)
  with open(theirs.path, "rb") as f:
    (other / "tokenizer.model").write_bytes(f.read())
  config = experiment.inherit_tokenizer(small_config(2, tmp_path / "run", init=f"trainer:{other}@4"))
  assert config.tokenizer == ""
  (tmp_path / "run").mkdir()
  tok = experiment.make_tokenizer(config, str(tmp_path / "run"))
  assert tok.vocab_size == theirs.vocab_size
  assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (other / "tokenizer.model").read_bytes()
