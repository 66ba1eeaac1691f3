"""Tests of the data config schema."""
import pytest

from qwenvl_jax.data.config import STAGE2_MIXTURE, default_data_config


def test_defaults_per_stage():
  c1, c2, c3 = (default_data_config(s) for s in (1, 2, 3))
  assert c1.source == c2.source == c3.source == "synthetic"
  # The paper's seven stage-2 tasks, weighted by its sample counts (RECIPES §3.3).
  assert dict(c2.mixture) == {"caption": 19.7, "vqa": 3.6, "grounding": 3.5, "ref": 8.7,
                              "grounded_caption": 8.7, "ocr": 24.8, "text": 7.8} == STAGE2_MIXTURE
  assert not c1.mixture and not c3.mixture
  # Official fine-tuning pads each sample (stage 3); pre-training packs.
  assert c1.packing and c2.packing and not c3.packing
  assert c3.system == "You are a helpful assistant."


def test_overrides_like_the_command_line():
  c = default_data_config(2)
  c.lock()  # config_flags locks the config: overrides must hit existing fields
  c.mixture.ocr = 0.0
  c.mixture_sources.vqa = "jsonl:/data/vqa.jsonl"
  c.update({"strict": True, "num_workers": 4})
  assert c.mixture.ocr == 0.0 and c.mixture_sources.vqa.startswith("jsonl:") and c.strict and c.num_workers == 4
  with pytest.raises(TypeError):
    c.num_workers = "four"


def test_bad_stage():
  with pytest.raises(ValueError, match="stage"):
    default_data_config(4)
