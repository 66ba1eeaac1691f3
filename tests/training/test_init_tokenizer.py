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


def _inherit(config):
  return experiment.inherit_tokenizer(config, config.workdir)


def test_a_params_checkpoint_lends_the_tokenizer_it_keeps(tmp_path):
  ckpt = _params(tmp_path / "ckpt", {"image_size": 56, "tokenizer": "sentencepiece:tokenizer.model"})
  config = small_config(3, tmp_path / "run", init=f"params:{ckpt}")
  assert _inherit(config).tokenizer == f"sentencepiece:{ckpt / 'tokenizer.model'}"
  assert config.tokenizer == ""  # the caller's config is not changed
  explicit = small_config(3, tmp_path / "run", init=f"params:{ckpt}", tokenizer="qwen:mine.tiktoken")
  assert _inherit(explicit).tokenizer == "qwen:mine.tiktoken"  # an explicit one wins
  assert _inherit(small_config(3, tmp_path / "run")).tokenizer == ""  # no init: the synthetic vocabulary
  # A resumed run keeps what its config.json recorded (a run started before this rule recorded ''), whatever the
  # init says now: a config difference would refuse the resume.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(json.dumps({"tokenizer": ""}))
  assert _inherit(config).tokenizer == ""


def test_a_params_checkpoint_without_a_tokenizer_is_refused_before_anything_is_written(tmp_path):
  ckpt = _params(tmp_path / "ckpt", {"image_size": 56})
  config = small_config(3, tmp_path / "run", init=f"params:{ckpt}")
  with pytest.raises(errors.ConfigError, match="keeps no tokenizer") as e:
    train(config)
  assert "--config.tokenizer=qwen:" in e.value.hint
  assert not (tmp_path / "run").exists()
  (tmp_path / "not_params").mkdir()  # e.g. a Hugging Face folder or a run directory given as params:
  with pytest.raises(errors.ConfigError, match="is not a params checkpoint") as e:
    _inherit(small_config(3, tmp_path / "run", init=f"params:{tmp_path / 'not_params'}"))
  assert "trainer:RUN" in e.value.hint


def test_a_run_lends_its_tokenizer_spec_or_its_own_vocabulary(tmp_path):
  other = tmp_path / "stage1"
  (other / "checkpoints" / "4" / "params").mkdir(parents=True)
  (other / "config.json").write_text(json.dumps({"tokenizer": "qwen:/data/qwen.tiktoken"}))
  for init in (f"trainer:{other}", f"params:{other / 'checkpoints' / '4' / 'params'}"):  # a run's step as params:
    assert _inherit(small_config(2, tmp_path / "run", init=init)).tokenizer == "qwen:/data/qwen.tiktoken"
  # A run on the synthetic vocabulary: the new run copies its tokenizer.model (here one of another size and seed
  # than the new config would draw), so both runs tokenize alike.
  (other / "config.json").write_text(json.dumps({"tokenizer": ""}))
  with pytest.raises(errors.ConfigError, match="cannot tell which vocabulary"):  # and it is not there
    _inherit(small_config(2, tmp_path / "run", init=f"trainer:{other}"))
  theirs = train_synthetic_tokenizer(os.path.join(tmp_path, "theirs"), vocab_size=700, seed=5)
  with open(theirs.path, "rb") as f:
    (other / "tokenizer.model").write_bytes(f.read())
  config = _inherit(small_config(2, tmp_path / "run", init=f"trainer:{other}@4"))
  assert config.tokenizer == ""
  (tmp_path / "run").mkdir()
  tok = experiment.make_tokenizer(config, str(tmp_path / "run"))
  assert tok.vocab_size == theirs.vocab_size
  assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (other / "tokenizer.model").read_bytes()
