"""The ViT trunk against a PyTorch trunk written from the spec (head-interleaved QKV, exact GELU, bicubic pos)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenvl_jax.model import VisionConfig, VisionTransformer, vit
from tests.model import torch_reference


def _pair(image_size, seed=0):
  cfg = VisionConfig(width=24, layers=2, heads=3, mlp_dim=40, patch_size=14, pos_grid=4, image_size=image_size)
  torch.manual_seed(seed)
  ref = torch_reference.TorchVisionTrunk(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.patch_size,
                                         cfg.pos_grid).eval()
  with torch.no_grad():  # non-trivial LayerNorm affines so a swapped scale/bias cannot pass
    for m in ref.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
  ours = VisionTransformer(cfg, dtype=jnp.float32, param_dtype=jnp.float32, remat_policy="none", rngs=nnx.Rngs(0))
  torch_reference.load_into(ours, torch_reference.vision_trunk_to_jax(ref, cfg.heads))
  return cfg, ours, ref


def _pixels(n, size, seed):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@nnx.jit
def _apply(model, images):
  return model(images)


@pytest.mark.parity
@pytest.mark.parametrize("image_size", [56, 112])  # 4x4 grid (stored table as is) and 8x8 (bicubic upsampling)
def test_trunk_matches_pytorch(image_size):
  cfg, ours, ref = _pair(image_size)
  images = _pixels(2, image_size, seed=image_size)
  pixels = np.asarray(vit.normalize_pixels(jnp.asarray(images))).transpose(0, 3, 1, 2)
  with torch.no_grad():
    expected = ref(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()
  got = np.asarray(_apply(ours, jnp.asarray(images)))
  assert got.shape == (2, cfg.num_patches, cfg.width)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # float32, accumulation order only


def test_normalization_uses_clip_constants():
  white = np.full((1, 2, 2, 3), 255, np.uint8)
  got = np.asarray(vit.normalize_pixels(jnp.asarray(white)))[0, 0, 0]
  np.testing.assert_allclose(got, (1 - np.array([0.48145466, 0.4578275, 0.40821073]))
                             / np.array([0.26862954, 0.26130258, 0.27577711]), rtol=1e-6)
  with pytest.raises(TypeError, match="uint8"):
    vit.normalize_pixels(jnp.zeros((1, 2, 2, 3), jnp.float32))


def test_wrong_image_size_is_an_error():
  _, ours, _ = _pair(56)
  with pytest.raises(ValueError, match="expects"):
    ours(jnp.zeros((1, 112, 112, 3), jnp.uint8))
