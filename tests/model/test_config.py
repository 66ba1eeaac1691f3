"""Presets and their parameter counts at full size, computed with jax.eval_shape (nothing allocated)."""

import pytest
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import QwenVL, VisionConfig, get_preset, qwen_vl_7b, tiny


def _count(cfg):
  _, state = sharding.abstract_model(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
  return {k: sharding.count_params(state[k]) for k in ("visual", "adapter", "llm")}


def test_full_size_parameter_count_matches_reference():
  counts = _count(qwen_vl_7b())
  # QWENVL_SPEC §5.2: ViT trunk 1,842,770,688; attn_pool 76,054,528 + ln_post/proj 16,785,408; LLM 7,721,324,544.
  assert counts["visual"] == 1_842_770_688
  assert counts["adapter"] == 76_054_528 + 16_785_408
  assert counts["visual"] + counts["adapter"] == 1_935_610_624
  assert counts["llm"] == 7_721_324_544
  assert sum(counts.values()) == 9_656_935_168


def test_resolution_does_not_change_parameters():
  assert _count(qwen_vl_7b().with_image_size(224)) == _count(qwen_vl_7b())


def test_mid_preset_is_about_one_billion():
  total = sum(_count(get_preset("mid")).values())
  assert 0.9e9 < total < 1.1e9


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    VisionConfig(image_size=450)
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("qwen_vl_70b")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tiny(image_pad_id=5000)
  with pytest.raises(ValueError, match="remat_policy"):
    tiny(remat_policy="sometimes")


def test_a_misspelt_dtype_lists_the_known_ones():
  """`qwenvl_jax.load(..., dtype="bflaot16")` said only "unknown dtype 'bflaot16'", not what to write instead."""
  with pytest.raises(ValueError, match="unknown dtype 'bflaot16'; known: 'bfloat16', 'float32', 'float16'"):
    tiny(dtype="bflaot16")
  with pytest.raises(ValueError, match="unknown param_dtype 'float16'; known: 'bfloat16', 'float32'"):
    tiny(param_dtype="float16")
