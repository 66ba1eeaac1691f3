"""The adapter (resampler + ln_post + proj) against a module built on torch.nn.MultiheadAttention."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenvl_jax.model import Adapter, ResamplerConfig, positional
from tests.model import torch_reference


@nnx.jit
def _apply(model, x):
  return model(x)


@pytest.mark.parity
@pytest.mark.parametrize("patch_grid", [4, 8])  # keys at the query grid, and bicubic-interpolated keys
def test_adapter_matches_torch_multihead_attention(patch_grid):
  cfg = ResamplerConfig(grid=4, heads=4)
  d, kv_dim = 32, 24
  torch.manual_seed(patch_grid)
  ref = torch_reference.TorchAdapter(cfg.grid, d, cfg.heads, kv_dim, positional.sincos_2d(d, cfg.grid)).eval()
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    ref.attn.in_proj_bias.uniform_(-0.5, 0.5)
    ref.attn.out_proj.bias.uniform_(-0.5, 0.5)
  ours = Adapter(cfg, kv_dim=kv_dim, embed_dim=d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  torch_reference.load_into(ours, torch_reference.adapter_to_jax(ref, cfg.heads))
  x = np.random.default_rng(0).normal(size=(3, patch_grid * patch_grid, kv_dim)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(_apply(ours, jnp.asarray(x)))
  assert got.shape == (3, cfg.num_queries, d)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_values_get_no_positional_embedding():
  # Gotcha 6: with identical patch features, the output must not depend on the key/value positions through the
  # values. Equal patches => equal keys up to the added positions, values all equal => output independent of pos.
  cfg = ResamplerConfig(grid=2, heads=2)
  ours = Adapter(cfg, kv_dim=8, embed_dim=16, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  x = jnp.ones((1, 4, 8))
  varied = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 8)), jnp.float32)
  base, base_varied = _apply(ours, x), _apply(ours, varied)
  ours.resampler.pos_embed[...] = ours.resampler.pos_embed[...] * 3.0
  shifted, shifted_varied = _apply(ours, x), _apply(ours, varied)
  # The change of positions is real: with distinct patches the output moves.
  assert not np.allclose(np.asarray(base_varied), np.asarray(shifted_varied), atol=1e-3)
  # Queries also carry pos_embed, so the output can change only through q; values identical => rows of softmax
  # weights sum to one over identical values => the attention output is identical.
  np.testing.assert_allclose(np.asarray(base), np.asarray(shifted), rtol=1e-5, atol=1e-5)
