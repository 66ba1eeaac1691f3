"""Checkpoint checks: every way a folder can be wrong is one CheckpointError line, raised before weights are read."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwenvl_jax.clip import CheckpointError, check_checkpoint, load_clip
from qwenvl_jax.clip.loading import layout


@pytest.fixture
def broken(clip_checkpoint, tmp_path):
  """A fresh copy of the tiny CLIP checkpoint to damage."""
  folder = tmp_path / "ckpt"
  shutil.copytree(clip_checkpoint[0], folder)
  return folder


def _edit_config(folder, **text_config):
  config = json.loads((folder / "config.json").read_text())
  config["text_config"].update(text_config)
  (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, edit):
  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, folder / "model.safetensors")


def _raises(folder, family, message):
  with pytest.raises(CheckpointError, match=message) as info:
    check_checkpoint(folder, family)
  assert "\n" not in str(info.value)


def test_a_good_checkpoint_passes_and_every_parameter_has_a_source(clip_checkpoint, chinese_clip_checkpoint):
  for (folder, _), family in ((clip_checkpoint, "clip"), (chinese_clip_checkpoint, "chinese_clip")):
    info = check_checkpoint(folder, family)
    assert info.config.family == family
    assert info.config.text_len == {"clip": 77, "chinese_clip": 52}[family]
    assert len(layout(info.config)) > 20


def test_missing_folder_config_and_weights(broken, tmp_path):
  _raises(tmp_path / "nowhere", "clip", "does not exist")
  (broken / "model.safetensors").unlink()
  _raises(broken, "clip", "holds no PyTorch checkpoint")
  (broken / "config.json").unlink()
  _raises(broken, "clip", "config.json is missing")


def test_another_family_is_refused(clip_checkpoint):
  _raises(clip_checkpoint[0], "chinese_clip", "not 'chinese_clip'")


def test_wrongly_shaped_checkpoint_names_the_tensor(broken):
  _edit_config(broken, intermediate_size=48)
  _raises(broken, "clip", r"text_model.encoder.layers.0.mlp.fc1.weight has shape \[64, 32\], config.json implies "
          r"\[48, 32\]")


def test_missing_and_unexpected_tensors(broken):
  _edit_tensors(broken, lambda t: t.pop("text_model.final_layer_norm.bias"))
  _raises(broken, "clip", "missing text_model.final_layer_norm.bias")
  _edit_tensors(broken, lambda t: t.update({"text_model.final_layer_norm.bias": np.zeros(32, np.float32),
                                            "text_model.head.weight": np.zeros((2, 2), np.float32)}))
  _raises(broken, "clip", "unexpected text_model.head.weight")


def test_wrong_vocabulary_size_is_caught_before_loading(broken):
  _edit_config(broken, vocab_size=7)
  with pytest.raises(CheckpointError, match="token_embedding.weight has shape"):
    load_clip(broken, "clip")
