"""Qwen-VL: ViT trunk + adapter + Qwen decoder, with image features written into the `<imgpad>` slots.

Letters: B rows, T tokens, M image slots per row, S image side, Q image tokens per image, D LLM width, V vocab.

Images travel with their row as a fixed-shape `uint8[B, M, S, S, 3]` plus `image_mask bool[B, M]`, so a step with
any number of images per row (up to M) compiles once and data parallelism keeps images next to their text. The
k-th `<imgpad>` of a row takes feature k % Q of the row's image k // Q (images in order of appearance), which
reproduces the reference's overwrite of the 256 slots between `<img>` and `</img>` (QWENVL_SPEC §3.3–3.4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import layers
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.model.qwen import KVCache, ModelOutput, QwenLM
from qwenvl_jax.model.resampler import Adapter
from qwenvl_jax.model.vit import VisionTransformer


class QwenVL(nnx.Module):
  """The whole model. Submodules `visual`, `adapter`, `llm` are the units the stage filters freeze."""

  def __init__(self, cfg: QwenVLConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, impl=cfg.attention_impl, rngs=rngs)
    self.visual = VisionTransformer(cfg.vision, remat_policy=cfg.remat_policy, scan_unroll=cfg.scan_unroll,
                                    cpu_layouts=cfg.cpu_layouts, **kw)
    self.adapter = Adapter(cfg.resampler, kv_dim=cfg.vision.width, embed_dim=cfg.llm.width, **kw)
    self.llm = QwenLM(cfg.llm, remat_policy=cfg.remat_policy, scan_unroll=cfg.scan_unroll, **kw)
    if cfg.cpu_layouts:
      for _, module in nnx.iter_graph(self):
        if isinstance(module, layers.Einsum):
          module.flat = True

  def encode_images(self, images: jax.Array, *, stop_vision_grad: bool = False) -> jax.Array:
    """uint8[B, M, S, S, 3] -> float[B, M, Q, D] image tokens in the compute dtype.

    stop_vision_grad: cut the backward pass at the ViT output (a frozen tower costs forward only).
    """
    b, m = images.shape[:2]
    feats = self.visual(images.reshape((b * m,) + images.shape[2:]))
    if stop_vision_grad:
      feats = jax.lax.stop_gradient(feats)
    tokens = self.adapter(feats)
    return tokens.reshape(b, m, tokens.shape[1], tokens.shape[2])

  def embed(self, input_ids: jax.Array, images: jax.Array | None = None, image_mask: jax.Array | None = None,
            *, stop_vision_grad: bool = False) -> jax.Array:
    """Token embeddings float[B, T, D] with each `<imgpad>` replaced by its image feature."""
    x = self.llm.embed(input_ids)
    if images is None:
      return x
    b, m = images.shape[:2]
    q = self.cfg.image_tokens
    feats = self.encode_images(images, stop_vision_grad=stop_vision_grad)
    if image_mask is not None:
      feats = jnp.where(image_mask[:, :, None, None], feats, 0)
    feats = feats.reshape(b, m * q, -1)
    is_pad = input_ids == self.cfg.image_pad_id
    slot = jnp.clip(jnp.cumsum(is_pad, axis=1) - 1, 0, m * q - 1)
    gathered = jnp.take_along_axis(feats, slot[:, :, None], axis=1)
    return jnp.where(is_pad[:, :, None], gathered.astype(x.dtype), x)

  def __call__(self, input_ids: jax.Array, *, images: jax.Array | None = None,
               image_mask: jax.Array | None = None, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, stop_vision_grad: bool = False,
               cache: KVCache | None = None, cache_index=None, rope_base=None, logn: bool = False,
               dropout_key: jax.Array | None = None) -> ModelOutput:
    """`ModelOutput(logits float[B, T, V], cache)` for `input_ids` int32[B, T]; `cache` is the updated cache
    when one is given, else None (one return type either way). dropout_key: as `features`.

    See `QwenLM.__call__` for the cache arguments and the inference-only `rope_base`/`logn` options.
    """
    h, new_cache = self.features(input_ids, images=images, image_mask=image_mask, positions=positions,
                                 segment_ids=segment_ids, stop_vision_grad=stop_vision_grad, cache=cache,
                                 cache_index=cache_index, rope_base=rope_base, logn=logn,
                                 dropout_key=dropout_key)
    logits = sharding.constrain(self.llm.lm_head(h), ("act_batch", "act_len", "act_vocab"))
    return ModelOutput(logits, new_cache)

  def features(self, input_ids: jax.Array, *, images: jax.Array | None = None,
               image_mask: jax.Array | None = None, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, stop_vision_grad: bool = False,
               cache: KVCache | None = None, cache_index=None, rope_base=None, logn: bool = False,
               dropout_key: jax.Array | None = None, window: int | None = None):
    """(hidden states float[B, T, D] after the final norm, updated cache or None): `__call__` without `lm_head`.

    dropout_key: training only, the key of the LLM's LoRA dropout (`model.lora`; None = no dropout).
    window: with a cache, the cache slots attended (`QwenLM.features`; None = all).

    The chunked loss (`model.losses`) applies `llm.lm_head`'s kernel to these a few tokens at a time, so the full
    [B, T, V] logits never exist.
    """
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = self.embed(input_ids, images, image_mask, stop_vision_grad=stop_vision_grad)
    x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"))
    return self.llm.features(x, positions=positions, segment_ids=segment_ids, cache=cache,
                             cache_index=cache_index, rope_base=rope_base, logn=logn, dropout_key=dropout_key,
                             window=window)
