"""Session fixtures of the CLIP tests: tiny random checkpoints written by transformers (see checkpoints.py)."""
import pathlib

import pytest

from tests.clip.checkpoints import write_checkpoint


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory) -> tuple[pathlib.Path, object]:
  """(folder, transformers CLIPModel): safetensors, vocab.json + merges.txt, shortest-edge resize + center crop."""
  folder = tmp_path_factory.mktemp("tiny_clip")
  return folder, write_checkpoint(folder, "clip", seed=1)


@pytest.fixture(scope="session")
def chinese_clip_checkpoint(tmp_path_factory) -> tuple[pathlib.Path, object]:
  """(folder, transformers ChineseCLIPModel): pytorch_model.bin, vocab.txt, stretched to a square (no crop)."""
  folder = tmp_path_factory.mktemp("tiny_chinese_clip")
  return folder, write_checkpoint(folder, "chinese_clip", seed=2, bin=True, squash_resize=True)
