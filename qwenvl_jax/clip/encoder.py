"""Transformer pieces shared by the CLIP towers: attention, MLP, pre-LN block, scanned layer stacks.

Letters: B batch, L tokens, W width, N heads, H head dim, F MLP width.

Parameters are created with logical axis names; a tower passes its own names for width, MLP and heads
(`VISION_AXES`, `TEXT_AXES`). Layers are stacked on a leading `layers` axis and applied with a scan, so compile time
does not grow with depth (12 layers for ViT-B/32 compile as one).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.clip.config import TowerConfig
from qwenvl_jax.model import attention, layers

# Logical axis names of each tower's width, MLP and head dimensions.
VISION_AXES = {"embed": "vit_embed", "mlp": "vit_mlp", "heads": "vit_heads"}
TEXT_AXES = {"embed": "embed", "mlp": "mlp", "heads": "q_heads"}
# Random init only serves tests and benchmarks (real weights come from `clip.loading`).
INIT = nnx.initializers.normal(0.02)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The MLP activation transformers' `ACT2FN[name]` is (quick_gelu: x * sigmoid(1.702 x); gelu: exact erf)."""
  table = {
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
  }
  return table[name]


class Attention(nnx.Module):
  """Multi-head self-attention with a fused [W, 3, N, H] QKV kernel (q, k, v of the reference stacked)."""

  def __init__(self, cfg: TowerConfig, axes: dict[str, str], *, dtype, rngs: nnx.Rngs):
    w, n, h = cfg.width, cfg.heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=INIT, rngs=rngs)
    self.qkv = layers.Einsum("btw,wknh->btknh", (w, 3, n, h), (axes["embed"], None, axes["heads"], "head_dim"),
                             bias_shape=(3, n, h), bias_axes=(None, axes["heads"], "head_dim"), **kw)
    self.out = layers.Einsum("btnh,nhw->btw", (n, h, w), (axes["heads"], "head_dim", axes["embed"]),
                             bias_shape=(w,), bias_axes=(axes["embed"],), **kw)
    self.scale = h ** -0.5

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """float[B, L, W] -> float[B, L, W]; mask bool broadcastable to [B, N, L, L] (True = may attend) or None."""
    qkv = self.qkv(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return self.out(attention.dot_product_attention(q, k, v, mask=mask, scale=self.scale, impl="xla"))


class Mlp(nnx.Module):
  """fc1 -> activation -> fc2, both with bias."""

  def __init__(self, cfg: TowerConfig, axes: dict[str, str], *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=INIT, rngs=rngs)
    self.fc1 = layers.Einsum("btw,wf->btf", (cfg.width, cfg.mlp_dim), (axes["embed"], axes["mlp"]),
                             bias_shape=(cfg.mlp_dim,), bias_axes=(axes["mlp"],), **kw)
    self.fc2 = layers.Einsum("btf,fw->btw", (cfg.mlp_dim, cfg.width), (axes["mlp"], axes["embed"]),
                             bias_shape=(cfg.width,), bias_axes=(axes["embed"],), **kw)
    self.act = cfg.act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation(self.act)(self.fc1(x)))


class PreLnBlock(nnx.Module):
  """The CLIP encoder layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, cfg: TowerConfig, axes: dict[str, str], *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.ln1 = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, param_dtype=jnp.float32, **kw)
    self.attn = Attention(cfg, axes, **kw)
    self.ln2 = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, param_dtype=jnp.float32, **kw)
    self.mlp = Mlp(cfg, axes, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask)
    return x + self.mlp(self.ln2(x))


def make_stack(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` blocks with their parameters stacked on a leading `layers` axis (one compiled body)."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return make_block(rngs)

  return make(rngs)


def run_stack(blocks: nnx.Module, x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Applies stacked blocks in order: a scan, so compile time does not grow with depth."""

  @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def run(x, block, mask):
    return block(x, mask)

  return run(x, blocks, mask)
