"""The CLIP dual encoder in Flax NNX: ViT image tower, text tower, projections, logit scale.

Letters: B batch, S image side, p patch side, G patches per side, L tokens (G*G + 1 for images, T for text),
W tower width, N heads, H head dim, F MLP width, P projection width, V vocabulary.

Faithful to transformers' `CLIPModel` (tested against it in float32):
* images arrive as uint8[B, S, S, 3] already resized and cropped on the host (`clip.images`) and are normalized on
  device with the checkpoint's mean/std (4x fewer bytes to move than float pixels);
* patches are a bias-free stride-p convolution, a learned class token goes first, positions are added, then
  `pre_layrnorm`; blocks are pre-LN (x + attn(ln1(x)); x + mlp(ln2(x))); the image feature is `post_layernorm`
  of the class token;
* the CLIP text tower is causal pre-LN with a final LayerNorm; its feature is the state at the end-of-text token
  (the first `eos_token_id`, or, for old configs with eos_token_id == 2, the largest id, as transformers does).
  Causality is also why no padding mask is needed: the EOS query never sees the padding after it;
* embeddings are projected without bias, L2-normalized, and logits are exp(logit_scale) * cosine.
Chinese-CLIP swaps in the BERT text tower of `clip.bert`; everything else is shared.

Every parameter carries logical axis names (`vit_*` for the image tower, `embed`/`mlp`/`q_heads`/`vocab` for the
text tower, `clip_*` for the rest; see qwenvl_jax/sharding_rules.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.clip import bert
from qwenvl_jax.clip.config import ClipConfig, TextConfig, VisionConfig
from qwenvl_jax.clip.encoder import INIT, TEXT_AXES, VISION_AXES, PreLnBlock, make_stack, run_stack
from qwenvl_jax.model import layers

class VisionTower(nnx.Module):
  """uint8[B, S, S, 3] -> float32[B, W]: the pooled (post-LayerNorm class token) image feature."""

  def __init__(self, cfg: VisionConfig, mean, std, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    p, w = cfg.patch_size, cfg.width
    self.patch = layers.param(rngs, INIT, (p, p, 3, w), ("vit_patch", "vit_patch", "vit_channels", "vit_embed"),
                              jnp.float32)
    self.class_embedding = layers.param(rngs, INIT, (w,), ("vit_embed",), jnp.float32)
    self.position = layers.param(rngs, INIT, (cfg.positions, w), ("vit_pos", "vit_embed"), jnp.float32)
    self.pre_ln = layers.LayerNorm(w, eps=cfg.ln_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.blocks = make_stack(lambda r: PreLnBlock(cfg, VISION_AXES, dtype=dtype, rngs=r), cfg.layers, rngs)
    self.post_ln = layers.LayerNorm(w, eps=cfg.ln_eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    s, p, g = cfg.image_size, cfg.patch_size, cfg.grid
    if images.dtype != jnp.uint8 or images.shape[1:] != (s, s, 3):
      raise ValueError(f"images must be uint8[B, {s}, {s}, 3], got {images.dtype}{list(images.shape)}")
    b = images.shape[0]
    x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    # Row-major patches, each flattened as (row, col, channel) to match the [p, p, 3, W] kernel.
    x = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, 3).astype(self.dtype)
    x = jnp.einsum("blpqc,pqcw->blw", x, self.patch[...].astype(self.dtype))
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.position[...].astype(self.dtype)
    x = run_stack(self.blocks, self.pre_ln(x), None)
    return self.post_ln(x[:, 0])


class ClipTextTower(nnx.Module):
  """int32[B, T] token ids -> float32[B, W]: the final-LayerNorm state at each row's end-of-text token."""

  def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.token_embedding = layers.param(rngs, INIT, (cfg.vocab_size, cfg.width), ("vocab", "embed"), jnp.float32)
    self.position = layers.param(rngs, INIT, (cfg.max_positions, cfg.width), ("clip_text_pos", "embed"),
                                 jnp.float32)
    self.blocks = make_stack(lambda r: PreLnBlock(cfg, TEXT_AXES, dtype=dtype, rngs=r), cfg.layers, rngs)
    self.final_ln = layers.LayerNorm(cfg.width, eps=cfg.ln_eps, dtype=jnp.float32, param_dtype=jnp.float32,
                                     rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids int32[B, T] (T <= max_positions); mask bool[B, T] is unused: causality hides the padding."""
    del mask
    t = ids.shape[1]
    if t > self.cfg.max_positions:
      raise ValueError(f"{t} tokens > max_positions={self.cfg.max_positions}")
    x = jnp.take(self.token_embedding[...], ids, axis=0) + self.position[:t]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
    x = self.final_ln(run_stack(self.blocks, x.astype(self.dtype), causal))
    if self.cfg.eos_token_id == 2:
      # Configs written before transformers PR #24773 carry eos_token_id 2; the reference then pools at the
      # largest id of the row, which is the EOT token of the original vocabulary.
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax(ids == self.cfg.eos_token_id, axis=-1)
    return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class ClipModel(nnx.Module):
  """Both towers, their projections and the logit scale.

  `image_embeds(images)` and `text_embeds(ids, mask)` return L2-normalized float32[B, P]; `__call__` returns
  `(image_embeds, text_embeds, logits_per_image float32[B_img, B_txt])` as transformers' CLIPModel does.
  """

  def __init__(self, cfg: ClipConfig, *, mean, std, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = VisionTower(cfg.vision, mean, std, dtype=dtype, rngs=rngs)
    if cfg.family == "clip":
      self.text = ClipTextTower(cfg.text, dtype=dtype, rngs=rngs)
    else:
      self.text = bert.BertTextTower(cfg.text, dtype=dtype, rngs=rngs)
    p = cfg.projection_dim
    self.visual_projection = layers.param(rngs, INIT, (cfg.vision.width, p), ("vit_embed", "clip_proj"),
                                          jnp.float32)
    self.text_projection = layers.param(rngs, INIT, (cfg.text.width, p), ("embed", "clip_proj"), jnp.float32)
    self.logit_scale = layers.param(rngs, nnx.initializers.constant(2.6592), (), (), jnp.float32)

  def image_embeds(self, images: jax.Array) -> jax.Array:
    """uint8[B, S, S, 3] (resized + cropped) -> float32[B, P], unit L2 norm."""
    return _unit(self.vision(images).astype(jnp.float32) @ self.visual_projection[...])

  def text_embeds(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """int32[B, T] ids, bool[B, T] mask (True = real token) -> float32[B, P], unit L2 norm."""
    return _unit(self.text(ids, mask).astype(jnp.float32) @ self.text_projection[...])

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array):
    image, text = self.image_embeds(images), self.text_embeds(ids, mask)
    return image, text, jnp.exp(self.logit_scale[...]) * image @ text.T


def _unit(x: jax.Array) -> jax.Array:
  # As transformers: divide by the norm (no epsilon: a zero embedding is a broken checkpoint, let it be NaN).
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def pair_similarity(model: ClipModel, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """float32[B]: cosine similarity of images[b] and texts[b] (the diagonal of logits_per_image / logit scale).

  This is the "CLIP score" that LAION-style filters threshold (0.28 for ViT-B/32 in LAION-5B). Rows are
  independent: a row's score does not depend on any other row of the batch.
  """
  return jnp.sum(model.image_embeds(images) * model.text_embeds(ids, mask), axis=-1)
