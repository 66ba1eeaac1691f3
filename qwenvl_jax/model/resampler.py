"""The position-aware vision-language adapter: resampler (`attn_pool`) + `ln_post` + `proj` (QWENVL_SPEC §1.5–1.6).

Letters: B images, L patches, W ViT width, Q queries (grid*grid), D LLM width, N heads, H head dim (D / N).

One cross-attention layer: Q learned queries attend to the L patch features.
* keys/values: `ln_kv(kv_proj(x))`; queries: `ln_q(query)` (the LayerNorm is applied to the parameter, Gotcha 8);
* the 2-D sin-cos table is added *after* the LayerNorms to queries (as stored, grid x grid) and keys (bicubically
  interpolated to the patch grid), never to values (Gotcha 6);
* attention is `nn.MultiheadAttention` with the blocked in-projection (`chunk(3)`), q scaled by sqrt(1/H);
* then `ln_post` and `x @ proj` (a raw [in, out] matrix, Gotcha 3–4).
The resampler and the output head are separate submodules so stage filters can treat them differently (the
official `fix_vit` trains `attn_pool` but freezes `ln_post` and `proj`, Gotcha 22).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import attention, layers, positional
from qwenvl_jax.model.config import ResamplerConfig


class CrossAttention(nnx.Module):
  """`torch.nn.MultiheadAttention(D, N)` semantics with separate query, key and value inputs."""

  def __init__(self, dim: int, heads: int, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
    h = dim // heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # in_proj_weight of `nn.MultiheadAttention` is Xavier-uniform over the packed [3D, D] matrix; its out_proj is a
    # Linear, which the reference's `_init_weights` sets to N(0, 0.02) like the other Linears.
    proj = lambda: layers.Einsum("btd,dnh->btnh", (dim, heads, h), ("embed", "q_heads", "head_dim"),
                                 bias_shape=(heads, h), bias_axes=("q_heads", "head_dim"),
                                 kernel_init=layers.xavier_uniform_in_proj(), **kw)
    self.q, self.k, self.v = proj(), proj(), proj()
    self.out = layers.Einsum("btnh,nhd->btd", (heads, h, dim), ("q_heads", "head_dim", "embed"),
                             bias_shape=(dim,), bias_axes=("embed",), **kw)
    self.scale = float(np.sqrt(1.0 / h))
    self.impl = impl

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """query float[B, Q, D], key/value float[B, L, D] -> float[B, Q, D]."""
    q = self.q(query)
    q = q * jnp.asarray(self.scale, q.dtype)  # torch >= 2.0 scales q by sqrt(1/H) before q k^T
    out = attention.dot_product_attention(q, self.k(key), self.v(value), mask=None, scale=1.0, impl=self.impl)
    return self.out(out)


class Resampler(nnx.Module):
  """Patch features float[B, L, W] -> query features float[B, Q, D] (the reference's `attn_pool`)."""

  def __init__(self, cfg: ResamplerConfig, *, kv_dim: int, embed_dim: int, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, impl: str = "xla", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q, d = cfg.num_queries, embed_dim
    self.query = layers.param(rngs, nnx.initializers.truncated_normal(0.02), (q, d), ("queries", "embed"),
                              param_dtype)
    table = positional.sincos_2d(d, cfg.grid)
    # A Param (not a constant): it is in the checkpoint and the official SFT recipe trains it.
    self.pos_embed = layers.param(rngs, lambda key, shape, dtype: jnp.asarray(table, dtype), (q, d),
                                  ("queries", "embed"), param_dtype)
    self.kv_proj = layers.Einsum("bld,de->ble", (kv_dim, d), ("vit_embed", "embed"), **kw)
    self.ln_q = layers.LayerNorm(d, eps=cfg.ln_eps, **kw)
    self.ln_kv = layers.LayerNorm(d, eps=cfg.ln_eps, **kw)
    self.attn = CrossAttention(d, cfg.heads, impl=impl, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l = x.shape[0], x.shape[1]
    patch_grid = int(round(l ** 0.5))
    if patch_grid * patch_grid != l:
      raise ValueError(f"{l} patches do not form a square grid")
    pos = self.pos_embed[...]
    pos_k = positional.interpolate_grid(pos, patch_grid).astype(self.dtype)  # float32 interpolation, then cast
    kv = self.ln_kv(self.kv_proj(x))
    q = self.ln_q(self.query[...])
    q = jnp.broadcast_to((q + pos.astype(self.dtype))[None], (b,) + q.shape)
    out = self.attn(q, kv + pos_k[None], kv)
    return sharding.constrain(out, ("act_batch", "act_len", "act_embed"))


class Adapter(nnx.Module):
  """Resampler + `ln_post` + `x @ proj`: patch features float[B, L, W] -> LLM-width image tokens float[B, Q, D]."""

  def __init__(self, cfg: ResamplerConfig, *, kv_dim: int, embed_dim: int, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, impl: str = "xla", rngs: nnx.Rngs):
    self.dtype = dtype
    self.resampler = Resampler(cfg, kv_dim=kv_dim, embed_dim=embed_dim, dtype=dtype, param_dtype=param_dtype,
                               impl=impl, rngs=rngs)
    self.ln_post = layers.LayerNorm(embed_dim, eps=cfg.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = layers.param(rngs, nnx.initializers.normal(embed_dim ** -0.5), (embed_dim, embed_dim),
                             ("embed", "embed_out"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_post(self.resampler(x))
    return jnp.einsum("bqd,de->bqe", x, self.proj[...].astype(self.dtype))
