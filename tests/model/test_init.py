"""Random initialization follows the reference PyTorch modules (what is trained from scratch: the adapter in stage 1,
and every part of a model built without converted weights).

- ViT (`visual.py` of Qwen-VL): `nn.Linear` / `nn.Conv2d` keep PyTorch's default U(+-1/sqrt(fan_in)); the
  positional table is `width**-0.5 * randn`.
- Adapter: `nn.MultiheadAttention.in_proj_weight` is Xavier-uniform over the packed [3D, D] matrix; the other Linears
  (`kv_proj`, `out_proj`) are N(0, 0.02) from `Resampler._init_weights`; `query` is trunc-normal(0.02); `proj` is
  `D**-0.5 * randn`.
- Decoder: N(0, 0.02) everywhere (`initializer_range`).
The width-32 tiny ViT makes the difference visible: its default-init std is 0.10, five times 0.02.
"""
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.model import QwenVL
from qwenvl_jax.model.config import tiny


@pytest.fixture(scope="module")
def model():
  return QwenVL(tiny(), rngs=nnx.Rngs(0))


def _uniform(a, bound):
  a = np.asarray(a).ravel()
  assert np.abs(a).max() <= bound * (1 + 1e-6)
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.1)


def test_vit_linears_and_conv_use_pytorch_default_init(model):
  w = model.cfg.vision.width
  blocks = model.visual.blocks
  _uniform(blocks.attn.qkv.kernel[...], 1 / np.sqrt(w))                     # fan_in = width
  _uniform(blocks.attn.out.kernel[...], 1 / np.sqrt(w))                     # fan_in = heads * head_dim
  _uniform(blocks.mlp.fc.kernel[...], 1 / np.sqrt(w))
  _uniform(blocks.mlp.proj.kernel[...], 1 / np.sqrt(model.cfg.vision.mlp_dim))
  p = model.cfg.vision.patch_size
  _uniform(model.visual.conv1[...], 1 / np.sqrt(3 * p * p))                 # fan_in = 3 x 14 x 14
  np.testing.assert_allclose(np.asarray(model.visual.positional_embedding[...]).std(), w ** -0.5, rtol=0.1)


def test_adapter_init_matches_resampler_init_weights(model):
  attn = model.adapter.resampler.attn
  d = model.cfg.llm.width
  for proj in (attn.q, attn.k, attn.v):
    _uniform(proj.kernel[...], np.sqrt(6 / (d + 3 * d)))                     # Xavier over the packed [3D, D]
  np.testing.assert_allclose(np.asarray(attn.out.kernel[...]).std(), 0.02, rtol=0.15)
  np.testing.assert_allclose(np.asarray(model.adapter.resampler.kv_proj.kernel[...]).std(), 0.02, rtol=0.15)
  np.testing.assert_allclose(np.asarray(model.adapter.proj[...]).std(), d ** -0.5, rtol=0.1)


def test_decoder_is_normal_002(model):
  blocks = model.llm.blocks
  for kernel in (blocks.attn.qkv.kernel, blocks.mlp.w1.kernel, blocks.mlp.c_proj.kernel):
    np.testing.assert_allclose(np.asarray(kernel[...]).std(), 0.02, rtol=0.1)
