"""The Qwen-VL vision trunk: OpenCLIP ViT-bigG/14 without class token or final LayerNorm (QWENVL_SPEC §1.1–1.4).

Letters: B images, S image side, P patch side, G patches per side, L patches (G*G), W width, Nv heads, Hv head
dim (W / Nv), Fv MLP width.

Faithfulness notes (each is tested against PyTorch):
* pixels are normalized with the OpenAI-CLIP mean/std on device (the pipeline delivers PIL-resized uint8);
* the positional table is stored at 16x16 and bicubically upsampled (PyTorch semantics, float32) to the grid in
  use, then added before `ln_pre`;
* the fused QKV is head-interleaved: output row h*3*Hv + t*Hv + d with t in {q, k, v}; the kernel keeps that
  structure as [W, Nv, 3, Hv];
* q is scaled by 1/sqrt(Hv) *before* q k^T; GELU is exact (erf); LayerNorm eps 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import attention, layers, positional
from qwenvl_jax.model.config import VisionConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize_pixels(images: jax.Array) -> jax.Array:
  """uint8[..., S, S, 3] RGB -> float32 CLIP-normalized (ToTensor + Normalize of the reference)."""
  if images.dtype != jnp.uint8:
    raise TypeError(f"images must be uint8 RGB after the PIL resize, got {images.dtype}")
  return (images.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


class VisionAttention(nnx.Module):
  """Self-attention over all patches with the reference's head-interleaved fused QKV."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
    w, n, h = cfg.width, cfg.heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The reference's in_proj / out_proj are `nn.Linear`s with PyTorch's default init.
    self.qkv = layers.Einsum("blw,wnkh->blnkh", (w, n, 3, h), ("vit_embed", "vit_heads", None, "head_dim"),
                             bias_shape=(n, 3, h), bias_axes=("vit_heads", None, "head_dim"),
                             kernel_init=layers.torch_default_init(0, (1, 2, 3)), **kw)
    self.out = layers.Einsum("blnh,nhw->blw", (n, h, w), ("vit_heads", "head_dim", "vit_embed"),
                             bias_shape=(w,), bias_axes=("vit_embed",),
                             kernel_init=layers.torch_default_init((0, 1), 2), **kw)
    self.scale = 1.0 / float(np.sqrt(h))
    self.impl = impl

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, L, W] -> float[B, L, W]; no mask (full bidirectional attention)."""
    qkv = self.qkv(x)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    # The reference multiplies q by 1/sqrt(Hv) before the matmul; scaling q here and passing scale=1 keeps that
    # order of rounding in bf16.
    q = q * jnp.asarray(self.scale, q.dtype)
    return self.out(attention.dot_product_attention(q, k, v, mask=None, scale=1.0, impl=self.impl))


class VisionBlock(nnx.Module):
  """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, **kw)
    self.attn = VisionAttention(cfg, impl=impl, **kw)
    self.ln_2 = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, **kw)
    self.mlp = layers.GeluMLP(cfg.width, cfg.mlp_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    x = x + self.mlp(self.ln_2(x))
    return sharding.constrain(x, ("act_batch", "act_len", "act_embed"))


class VisionTransformer(nnx.Module):
  """uint8 images -> patch features float[B, L, W] (before the adapter)."""

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32,
               remat_policy: str = "full", impl: str = "xla", scan_unroll: bool | int = 1,
               cpu_layouts: bool = False, rngs: nnx.Rngs):
    """cpu_layouts: normalize the pixels and cut the patches into buffers of their own
    (`QwenVLConfig.cpu_layouts`, a CPU option; the blocks' 2-D matmuls are set by `QwenVL`)."""
    self.cfg = cfg
    self.cpu_layouts = cpu_layouts
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.scan_unroll = scan_unroll
    p, w = cfg.patch_size, cfg.width
    # As the reference: `nn.Conv2d` default init, positional table `width**-0.5 * randn`.
    self.conv1 = layers.param(rngs, layers.torch_default_init((0, 1, 2), 3), (p, p, 3, w),
                              ("vit_patch", "vit_patch", "vit_channels", "vit_embed"), param_dtype)
    self.positional_embedding = layers.param(rngs, nnx.initializers.normal(w ** -0.5), (cfg.pos_grid ** 2, w),
                                             ("vit_pos", "vit_embed"), param_dtype)
    self.ln_pre = layers.LayerNorm(w, eps=cfg.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)

    self.blocks = make_blocks(rngs)

  def patchify(self, images: jax.Array) -> jax.Array:
    """uint8[B, S, S, 3] -> float[B, L, W]: normalize, the bias-free stride-P conv, row-major patch order."""
    b, s = images.shape[0], images.shape[1]
    if images.shape[1:] != (self.cfg.image_size, self.cfg.image_size, 3):
      raise ValueError(f"images have shape {images.shape[1:]}, the model expects "
                       f"{(self.cfg.image_size, self.cfg.image_size, 3)}")
    p, g = self.cfg.patch_size, self.cfg.grid
    del s
    kernel = self.conv1[...].astype(self.dtype)
    if self.cpu_layouts:
      # The patches are cut from the uint8 pixels into a matrix [B*L, P*P*3], (p, q, c) inside a patch, for one
      # [B*L, P*P*3] x [P*P*3, W] matmul whose weight gradient is the plain x^T dy. XLA:CPU runs this transposing
      # copy element by element (~2 ns each), so when a patch row holds an even number of bytes they move in pairs,
      # packed into uint16 (first byte low) and unpacked by arithmetic. Alone, cut and normalized, 32 images take
      # 4.3 ms against 12.9 ms for float32 pixels cut directly; in the train step XLA:CPU drops the barriers late
      # and fuses cut and normalization into the one loop that writes the matrix (13.1 -> 10.7 ms at batch 16),
      # which the forward and weight-gradient matmuls then both read (DESIGN §4i, `QwenVLConfig.cpu_layouts`).
      row = p * 3
      if row % 2 == 0:
        pairs = images.reshape(b, g, p, g, row // 2, 2).astype(jnp.uint16)
        x = jax.lax.optimization_barrier((pairs[..., 0] | (pairs[..., 1] << 8)).transpose(0, 1, 3, 2, 4))
        x = jnp.stack([x & 0xFF, x >> 8], axis=-1)
      else:
        x = jax.lax.optimization_barrier(images.reshape(b, g, p, g, row).transpose(0, 1, 3, 2, 4))
      x = x.reshape(b, g * g, p * p, 3)
      # One multiply-add per value (scale 1 / (255 std), offset -mean / std): the two divisions of
      # `normalize_pixels` cost XLA:CPU 7x more; the values differ from it by float rounding only.
      scale = jnp.asarray(1.0 / (255.0 * CLIP_STD), jnp.float32)
      x = x.astype(jnp.float32) * scale + jnp.asarray(-CLIP_MEAN / CLIP_STD, jnp.float32)
      x = jax.lax.optimization_barrier(x.astype(self.dtype).reshape(b, g * g, p * p * 3))
      return layers.flat_matmul("blk,kw->blw", x, kernel.reshape(p * p * 3, kernel.shape[-1]))
    # Patches are cut from the uint8 pixels (a quarter of the bytes of float32 to shuffle), then normalized; the
    # reference casts pixels to the weight dtype (bf16) before conv1.
    x = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, 3)
    x = normalize_pixels(x).astype(self.dtype)
    return jnp.einsum("blpqc,pqcw->blw", x, kernel)

  def __call__(self, images: jax.Array) -> jax.Array:
    """uint8[B, S, S, 3] -> float[B, L, W] in the compute dtype."""
    x = self.patchify(images)
    pos = positional.interpolate_grid(self.positional_embedding[...], self.cfg.grid)
    x = self.ln_pre(x + pos.astype(self.dtype))
    x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"))

    policy = layers.remat_policy(self.remat_policy)

    def block_fn(x, block):
      return block(x)

    if self.remat_policy != "none":
      block_fn = nnx.remat(block_fn, policy=policy, prevent_cse=False)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"},
              unroll=self.scan_unroll)
    def run(x, block):
      return block_fn(x, block)

    return run(x, self.blocks)
