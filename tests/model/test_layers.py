"""Numerics of the basic layers that the parity tests' float32 tolerances could hide (Gotchas 9 and 15)."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from qwenvl_jax.model import layers


def test_layernorm_eps_is_1e6_like_the_reference():
  # With activations of variance ~1e-6, eps 1e-6 vs PyTorch's default 1e-5 changes the output by ~2x.
  x = np.random.default_rng(0).normal(scale=1e-3, size=(4, 16)).astype(np.float32)
  ln = layers.LayerNorm(16, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  got = np.asarray(ln(jnp.asarray(x)))
  ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (16,), eps=1e-6).numpy()
  wrong = torch.nn.functional.layer_norm(torch.from_numpy(x), (16,), eps=1e-5).numpy()
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  assert not np.allclose(got, wrong, rtol=1e-2, atol=1e-2)


def test_vit_mlp_uses_exact_gelu():
  mlp = layers.GeluMLP(8, 16, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  mlp.fc.kernel[...] = jnp.eye(8, 16) * 3.0  # push pre-activations to where erf and tanh GELU differ
  mlp.proj.kernel[...] = jnp.eye(16, 8)
  x = np.linspace(-3, 3, 8, dtype=np.float32)[None, None]
  got = np.asarray(mlp(jnp.asarray(x)))[0, 0]
  pre = torch.from_numpy(x[0, 0] * 3.0)
  np.testing.assert_allclose(got, torch.nn.functional.gelu(pre).numpy(), rtol=1e-6, atol=1e-6)
  assert not np.allclose(got, torch.nn.functional.gelu(pre, approximate="tanh").numpy(), rtol=1e-6, atol=1e-6)


def test_rmsnorm_rounds_to_bf16_before_the_weight():
  # Reference: (x.float() * rsqrt(mean(x^2) + eps)).to(bf16) * weight(bf16), computed here with torch in bf16.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 32)).astype(np.float32)
  w = (1 + rng.normal(scale=0.3, size=(32,))).astype(np.float32)
  norm = layers.RMSNorm(32, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.asarray(w, jnp.bfloat16)
  got = np.asarray(norm(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
  xt, wt = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
  xf = xt.float()
  normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
  ref = (normed.to(torch.bfloat16) * wt).float().numpy()
  single_rounding = (normed * wt.float()).to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(got, ref)  # bit-exact in bf16
  assert not np.array_equal(ref, single_rounding)  # the two roundings really differ on this input
