"""LoRA adapters: a fresh adapter is the identity, merging is exact, shapes/axes/dtypes, the official trained count.

Tolerances: float32 compute. A fresh adapter (B = 0) adds exact zeros, so logits are bitwise the base's; merged vs
unmerged logits differ only by the rounding of W + s*A@B vs x@W + s*(x@A)@B: atol 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.model import QwenVL, get_preset, lora, tiny

RES = 56


def _model(param_dtype="float32"):
  cfg = tiny(dtype="float32", param_dtype=param_dtype, remat_policy="none").with_image_size(RES)
  return QwenVL(cfg, rngs=nnx.Rngs(0))


def _inputs():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 500, (2, 12)), jnp.int32)
  return ids


@nnx.jit
def _logits(model, ids, key=None):
  return model(ids, dropout_key=key).logits


ALL = lora.OFFICIAL_TARGETS + ("llm/blocks/mlp/c_proj", "visual/blocks/.*", "adapter/.*")


def test_fresh_adapters_give_exactly_the_base_logits():
  model, ids = _model(), _inputs()
  base = _logits(model, ids)
  lora.apply_lora(model, lora.LoraConfig(rank=4, targets=ALL), rngs=nnx.Rngs(1))
  assert len(lora.lora_modules(model)) > 8
  np.testing.assert_array_equal(np.asarray(_logits(model, ids)), np.asarray(base))


def test_merged_equals_unmerged_and_leaves_the_plain_tree():
  model, ids = _model(), _inputs()
  plain_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
  lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=16.0, targets=ALL), rngs=nnx.Rngs(1))
  for i, m in enumerate(lora.lora_modules(model).values()):
    m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape))
  unmerged = _logits(model, ids)
  base = _logits(_model(), ids)
  assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapters do something
  lora.merge_lora(model)
  assert {p for p, _ in nnx.to_flat_state(nnx.state(model))} == plain_paths
  np.testing.assert_allclose(np.asarray(_logits(model, ids)), np.asarray(unmerged), atol=1e-5, rtol=0)


def test_adapters_are_float32_per_layer_with_the_bases_axes():
  model = _model("bfloat16")
  lora.apply_lora(model, lora.LoraConfig(rank=8), rngs=nnx.Rngs(1))
  qkv = model.llm.blocks.attn.qkv
  layers, d = model.cfg.llm.layers, model.cfg.llm.width
  assert qkv.kernel.dtype == jnp.bfloat16
  assert qkv.lora_a.shape == (layers, d, 8) and qkv.lora_a.dtype == jnp.float32
  assert qkv.lora_b.shape == (layers, 8) + qkv.kernel.shape[2:] and qkv.lora_b.dtype == jnp.float32
  assert qkv.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert qkv.lora_b.get_metadata()["out_sharding"] == ("layers", None, None, "q_heads", "head_dim")
  # PEFT's kaiming-uniform bound 1/sqrt(fan_in), drawn independently per layer.
  a = np.asarray(qkv.lora_a[...])
  assert np.abs(a).max() <= 1 / np.sqrt(d) and not np.allclose(a[0], a[1])
  assert isinstance(qkv.lora_a, nnx.LoRAParam) and isinstance(qkv.lora_a, nnx.Param)


def test_dropout_only_with_a_key_and_reproducible():
  model, ids = _model(), _inputs()
  lora.apply_lora(model, lora.LoraConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(1))
  for i, m in enumerate(lora.lora_modules(model).values()):
    m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape))
  plain = _logits(model, ids)
  k = jax.random.key(3)
  dropped = _logits(model, ids, k)
  assert float(jnp.abs(dropped - plain).max()) > 1e-3
  np.testing.assert_array_equal(np.asarray(_logits(model, ids, k)), np.asarray(dropped))


def test_official_config_trains_112197632_parameters():
  """r = 64 on c_attn, attn.c_proj, w1, w2 of the 32-layer LLM (RECIPES §1.4), counted from abstract shapes."""
  cfg = get_preset("qwen_vl_7b")
  official = lora.LoraConfig(rank=64, alpha=16, dropout=0.05)
  state = nnx.state(nnx.eval_shape(lambda: lora.apply_lora(QwenVL(cfg, rngs=nnx.Rngs(0)), official,
                                                           rngs=nnx.Rngs(1))))
  assert lora.trained_count(state, official) == 112_197_632
  with_saved = lora.LoraConfig(rank=64, modules_to_save=("wte", "lm_head"))
  wte_head = 2 * cfg.llm.vocab_size * cfg.llm.width
  assert lora.trained_count(state, with_saved) == 112_197_632 + wte_head


def test_bad_configs_are_refused():
  # The reference's module name: every projection is listed (the first four in sorted order were the adapter's).
  with pytest.raises(ValueError, match=r"matches no projection.* \(the projections: adapter/resampler/attn/k, .*"
                                       r"llm/blocks/attn/qkv, .*visual/blocks/mlp/proj\)$"):
    lora.apply_lora(_model(), lora.LoraConfig(rank=4, targets=("llm/blocks/attn/c_attn",)), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="modules_to_save"):
    lora.LoraConfig(rank=4, modules_to_save=("embed",))
