"""The Qwen-7B decoder as used by Qwen-VL (QWENVL_SPEC §2), with an optional KV cache for generation.

Letters: B batch, T new tokens, S key slots (T in training, the cache length when decoding), D width, N heads,
H head dim, F MLP width, V vocabulary, L layers.

Faithfulness notes (tested against transformers' Qwen2ForCausalLM with mapped weights):
* RMSNorm eps 1e-6 with the reference's cast-before-weight; pre-norm blocks; untied `lm_head`;
* fused `c_attn` with bias in the blocked q|k|v layout, kept as a [D, 3, N, H] kernel; `c_proj` without bias;
* rotate-half RoPE over all H dims, base 10000, in float32; positions are explicit (per packed segment, or
  corrected for left padding), which the reference cannot express but equals it on unpadded rows;
* scores are divided by sqrt(H) rounded to the compute dtype (11.3125 in bf16, Gotcha 14);
* SwiGLU with SiLU on `w2`.
Dynamic NTK and logn scaling are inference-only options of `__call__` (Gotcha 13).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.model import attention, layers, positional
from qwenvl_jax.model.config import LLMConfig


class KVCache(NamedTuple):
  """Decoding state, stacked over layers. Keys are stored after RoPE (as the reference), heads-major: attention
  contracts [S, H] per (row, head) straight from the cache (`attention.cache_attention`), no relayout per step.

  An int8 cache (`init_cache(..., dtype=jnp.int8)`) stores k and v as int8 with one scale per (layer, row, slot,
  head) over the H entries (absmax, `qwix.quantize`): 2 L N (H + 2) bytes per token instead of 4 L N H in bf16
  (266 vs 512 KiB at full size). The scales are None in a float cache.
  """

  k: jax.Array  # [L, B, N, S, H]
  v: jax.Array  # [L, B, N, S, H]
  segment_ids: jax.Array  # int32[B, S]; 0 = empty slot or padding (never attended)
  k_scale: jax.Array | None = None  # [L, B, N, S, 1] in the compute dtype, int8 cache only
  v_scale: jax.Array | None = None  # [L, B, N, S, 1]

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None


# Logical axes of the cache's k, v (and their int8 scales, whose last dim is 1): [L, B, N, S, H].
KV_AXES = ("layers", "cache_batch", "cache_heads", "cache_len", "cache_head_dim")
SEGMENT_AXES = ("cache_batch", "cache_len")  # the cache's segment ids [B, S]


def constrain_cache(cache: KVCache) -> KVCache:
  """`cache` pinned to its layout under the enclosing `sharding.use_rules` (rows over the batch axes, heads over
  `tensor`): a jitted program that returns a cache it updated returns it in the layout it took (no resharding,
  no recompilation for a new input layout). A no-op outside `use_rules`."""
  kv = lambda x: None if x is None else sharding.constrain(x, KV_AXES)
  return KVCache(kv(cache.k), kv(cache.v), sharding.constrain(cache.segment_ids, SEGMENT_AXES),
                 kv(cache.k_scale), kv(cache.v_scale))


class ModelOutput(NamedTuple):
  """What `QwenLM` and `QwenVL` return, with or without a cache (one type, so callers never branch)."""

  logits: jax.Array  # float[B, T, V] in the compute dtype
  cache: KVCache | None  # the updated cache when one was passed, else None


def write_slots(buffer: jax.Array, update: jax.Array, cache_index: jax.Array | int) -> jax.Array:
  """`buffer` [B, S, ...] with `update` [B, T, ...] written at slots cache_index .. cache_index + T - 1.

  cache_index: an int32 scalar (every row at the same slot: left-padded batches) or int32[B] (each row at its
  own slot: the decode slots of a continuously batched server, whose rows started at different times).
  """
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buffer, update, cache_index, axis=1)
  return jax.vmap(lambda b, u, i: jax.lax.dynamic_update_slice_in_dim(b, u, i, axis=0))(buffer, update, cache_index)


def write_layer_slots(buffer: jax.Array, layer: jax.Array, update: jax.Array, cache_index: jax.Array | int
                      ) -> jax.Array:
  """The stacked `buffer` [L, B', N, S, X] with `update` [B, N, T, X] (B <= B') written into layer `layer`, rows
  0 .. B-1, at slots cache_index .. cache_index + T - 1 (an int32 scalar, or int32[B] one per row).

  Only the B x T new entries are written (a dynamic-update-slice or a scatter, in place in the loop carry): slicing
  the layer out, updating it and writing it back copied the whole layer twice per step, which dominated the
  decode step of many rows (bench/bench_serve.py).
  """
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice(buffer, update[None], (layer, 0, 0, cache_index, 0))
  b, n, t = update.shape[:3]
  rows = jnp.arange(b, dtype=jnp.int32)[:, None, None]
  heads = jnp.arange(n, dtype=jnp.int32)[None, :, None]
  slots = (jnp.asarray(cache_index, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32))[:, None, :]
  return buffer.at[layer, rows, heads, slots].set(update, indices_are_sorted=True, unique_indices=True)


def _quantize_kv(x: jax.Array, scale_dtype) -> tuple[jax.Array, jax.Array]:
  """float[B, T, N, H] -> (int8[B, T, N, H], scale[B, T, N, 1]): absmax per token and head."""
  q = qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=(0, 1, 2))
  return q.qvalue, q.scale.astype(scale_dtype)


def _stored(entries: tuple, k: jax.Array, v: jax.Array) -> tuple:
  """What the cache `entries` = (k, v) or (k, v, k_scale, v_scale) store of new k, v float[B, T, N, H], entry by
  entry: k and v as they are (cast on writing), or their int8 values and scales."""
  if len(entries) == 2:
    return k, v
  kq, ks = _quantize_kv(k, entries[2].dtype)
  vq, vs = _quantize_kv(v, entries[3].dtype)
  return kq, vq, ks, vs


def _attended(parts, dtype) -> tuple[jax.Array, jax.Array]:
  """(k, v) in `dtype` for attention from the cache's parts (k, v) or (k, v, k_scale, v_scale), any layout:
  dequantized one layer at a time inside the scan (a temporary of the jitted step, never stored)."""
  if len(parts) == 2:
    return parts[0].astype(dtype), parts[1].astype(dtype)
  return parts[0].astype(dtype) * parts[2].astype(dtype), parts[1].astype(dtype) * parts[3].astype(dtype)


def _write_kv(entries: tuple, layer: jax.Array, window: int, k: jax.Array, v: jax.Array, cache_index
              ) -> tuple[tuple, jax.Array, jax.Array]:
  """Writes the new k, v float[B, T, N, H] at `cache_index` into layer `layer` of the stacked cache entries
  `entries` = (k, v) or (k, v, k_scale, v_scale), each [L, B', N, S, ...]; returns (the updated entries, the
  layer's first B rows and `window` slots of k and v [B, N, window, H] in k's dtype for attention)."""
  b = k.shape[0]
  put = lambda buf, x: write_layer_slots(buf, layer, x.swapaxes(1, 2).astype(buf.dtype), cache_index)
  # One dynamic-slice of exactly what is attended (XLA:CPU copies it ~2x faster than a slice of a layer slice).
  read = lambda buf: jax.lax.dynamic_slice(buf, (layer, 0, 0, 0, 0), (1, b) + buf.shape[2:3] + (window,)
                                           + buf.shape[4:])[0]
  new = tuple(put(e, x) for e, x in zip(entries, _stored(entries, k, v)))
  return (new, *_attended([read(e) for e in new], k.dtype))


def _fill_rows(entries: tuple, layer: jax.Array, rows: jax.Array, k: jax.Array, v: jax.Array
               ) -> tuple[tuple, jax.Array, jax.Array]:
  """Writes a prompt's new k, v float[B, T, N, H] into layer `layer` of the stacked cache `entries` at cache rows
  `rows` int32[B] (a row >= B' is dropped), slots 0 .. T-1; returns (the updated entries, k and v as the cache
  holds them, [B, T, N, H] in k's dtype: the keys the prompt attends to are its own, so nothing is read back).

  One scatter of the B x T new entries into the carried cache, in place: no prompt-sized cache of its own (a
  server's prefill of 4 requests of 2048 tokens into the 7B model's int8 cache held a 2.1 GiB one)."""
  t, n = k.shape[1:3]
  index = (layer, rows[:, None, None], jnp.arange(n, dtype=jnp.int32)[None, :, None],
           jnp.arange(t, dtype=jnp.int32)[None, None, :])
  put = lambda buf, x: buf.at[index].set(x.swapaxes(1, 2).astype(buf.dtype), mode="drop", unique_indices=True)
  stored = _stored(entries, k, v)
  new = tuple(put(e, x) for e, x in zip(entries, stored))
  # What decoding will read back, as `_write_kv` gives attention.
  return (new, *_attended([x.astype(e.dtype) for e, x in zip(entries, stored)], k.dtype))


class SelfAttention(nnx.Module):
  """Causal multi-head self-attention with the fused blocked QKV (`c_attn`) and `c_proj`."""

  def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
    d, n, h = cfg.width, cfg.heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = layers.Einsum("btd,dknh->btknh", (d, 3, n, h), ("embed", None, "q_heads", "head_dim"),
                             bias_shape=(3, n, h), bias_axes=(None, "q_heads", "head_dim"), **kw)
    self.out = layers.Einsum("btnh,nhd->btd", (n, h, d), ("q_heads", "head_dim", "embed"), **kw)
    # The reference divides by torch.full([], sqrt(H), dtype=compute dtype): 11.3125 in bf16, not 11.3137.
    self.scale = 1.0 / float(np.asarray(np.sqrt(h), dtype=dtype))
    self.impl = impl

  def __call__(self, x, cos, sin, mask, q_scale, kv=None, cache_index=None, segment_ids=None, dropout_key=None):
    """x float[B, T, D] -> (float[B, T, D], (k, v) updated cache entries or None).

    kv: optional (entries, layer, window, rows): the stacked cache entries (k, v) [L, B', N, S, H] (B' >= B), or
      (k, v, k_scale, v_scale) of an int8 cache, this layer's index and the slots attended (the first `window`);
      the new keys/values are written into rows 0 .. B-1 of the layer at `cache_index`, and the updated entries
      are returned. With `rows` (int32[B], not None) they are written into those rows at slots 0 .. T-1 instead,
      and the T tokens attend among themselves under `mask` (`QwenLM.features`' prompt fill).
    q_scale: optional float32[B, T] logn factor applied to q (inference only).
    dropout_key: LoRA dropout key (training only; None = none).
    """
    keys = [None] * 2 if dropout_key is None else list(jax.random.split(dropout_key, 2))
    qkv = self.qkv(x, keys[0])
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = positional.apply_rope(q, cos, sin)
    k = positional.apply_rope(k, cos, sin)
    fill = kv is not None and kv[3] is not None
    if fill:
      new_kv, k, v = _fill_rows(kv[0], kv[1], kv[3], k.astype(q.dtype), v.astype(q.dtype))
    elif kv is not None:
      new_kv, k, v = _write_kv(*kv[:3], k.astype(q.dtype), v.astype(q.dtype), cache_index)
    else:
      new_kv = None
    if q_scale is not None:
      q = (q.astype(jnp.float32) * q_scale[:, :, None, None]).astype(q.dtype)
    if fill:
      out = attention.prefill_attention(q, k, v, mask=mask, scale=self.scale, impl=self.impl,
                                        segment_ids=segment_ids)
    elif kv is None:
      out = attention.dot_product_attention(q, k, v, mask=mask, scale=self.scale, impl=self.impl,
                                            segment_ids=segment_ids)
    else:
      out = attention.cache_attention(q, k, v, mask=mask, scale=self.scale, impl=self.impl)
    return self.out(out, keys[1]), new_kv


class DecoderBlock(nnx.Module):
  """h = x + attn(ln_1(x)); out = h + mlp(ln_2(h))."""

  def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = layers.RMSNorm(cfg.width, eps=cfg.rms_eps, **kw)
    self.attn = SelfAttention(cfg, impl=impl, **kw)
    self.ln_2 = layers.RMSNorm(cfg.width, eps=cfg.rms_eps, **kw)
    self.mlp = layers.SwiGLU(cfg.width, cfg.mlp_dim, **kw)

  def __call__(self, x, cos, sin, mask, q_scale, kv=None, cache_index=None, segment_ids=None, dropout_key=None):
    keys = [None] * 2 if dropout_key is None else list(jax.random.split(dropout_key, 2))
    attn_out, new_kv = self.attn(self.ln_1(x), cos, sin, mask, q_scale, kv, cache_index, segment_ids, keys[0])
    h = x + attn_out
    out = h + self.mlp(self.ln_2(h), keys[1])
    return sharding.constrain(out, ("act_batch", "act_len", "act_embed")), new_kv


class QwenLM(nnx.Module):
  """Token embeddings, the scanned decoder stack, `ln_f` and the untied `lm_head`."""

  def __init__(self, cfg: LLMConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat_policy: str = "full",
               impl: str = "xla", scan_unroll: bool | int = 1, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.scan_unroll = scan_unroll
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wte = nnx.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"),
                                                              eager_sharding=False),
                         rngs=rngs)

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return DecoderBlock(cfg, impl=impl, **dict(kw, rngs=rngs))

    self.blocks = make_blocks(rngs)
    self.ln_f = layers.RMSNorm(cfg.width, eps=cfg.rms_eps, **kw)
    self.lm_head = layers.Einsum("btd,dv->btv", (cfg.width, cfg.vocab_size), ("embed", "vocab"), **kw)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int32[B, T] -> float[B, T, D]."""
    return self.wte(input_ids)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots (all segments 0, so nothing is attended until written).

    dtype: the stored k/v dtype (default the compute dtype); int8 gives a quantized cache (`KVCache`).
    Under `sharding.use_rules` the cache is created in its layout (rows over the batch axes, heads over `tensor`).
    """
    c = self.cfg
    shape = (c.layers, batch, c.heads, max_len, c.head_dim)
    dtype = jnp.dtype(dtype or self.dtype)
    zeros = lambda shape, dtype: sharding.constrain(jnp.zeros(shape, dtype), KV_AXES)
    segments = sharding.constrain(jnp.zeros((batch, max_len), jnp.int32), SEGMENT_AXES)
    if dtype == jnp.int8:
      scales = shape[:-1] + (1,)
      return KVCache(zeros(shape, dtype), zeros(shape, dtype), segments, zeros(scales, self.dtype),
                     zeros(scales, self.dtype))
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"a KV cache is float or int8, got {dtype}")
    return KVCache(zeros(shape, dtype), zeros(shape, dtype), segments)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int | None = None,
               rope_base: jax.Array | float | None = None, logn: bool = False,
               dropout_key: jax.Array | None = None, window: int | None = None) -> ModelOutput:
    """Logits of the decoder on embeddings: `features` then `lm_head` (same arguments).

    Returns:
      ModelOutput(logits float[B, T, V] in the compute dtype, updated KVCache or None).
    """
    h, new_cache = self.features(x, positions=positions, segment_ids=segment_ids, cache=cache,
                                 cache_index=cache_index, rope_base=rope_base, logn=logn, dropout_key=dropout_key,
                                 window=window)
    logits = self.lm_head(h)
    return ModelOutput(sharding.constrain(logits, ("act_batch", "act_len", "act_vocab")), new_cache)

  def features(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int | None = None,
               rope_base: jax.Array | float | None = None, logn: bool = False,
               dropout_key: jax.Array | None = None, window: int | None = None, rows: jax.Array | None = None):
    """Runs the decoder on embeddings up to the final norm (the `lm_head` input).

    Args:
      x: float[B, T, D] input embeddings (image features already written in).
      positions: int32[B, T] RoPE positions.
      segment_ids: int32[B, T]; 0 = padding. Attention is causal within equal non-zero segments.
      cache: optional KVCache with S slots and B' >= B rows; the T new tokens of row b are written into cache row b
        at slots cache_index..cache_index+T-1 and attend to that row; rows B .. B'-1 are left as they are (a
        server decodes only the first rows of its slots, `serving.slots`).
      cache_index: int32 scalar slot of the first new token, or int32[B] one per row (required with a cache).
      rope_base: RoPE base (default the config's); pass the dynamic-NTK base at inference.
      logn: apply the reference's logn query scaling (inference only).
      dropout_key: the LoRA dropout key of this call (training only; split per layer and projection).
      window: with a cache, attend to its first `window` slots only (static; every query slot must be below it):
        a server whose rows are all short reads that much of the cache per step, not all of it. None = all S.
      rows: with a cache, a prompt fill: the T tokens of input row b go to cache row rows[b] (int32[B]; a row >= B'
        is dropped: padding) at slots 0 .. T-1, that row's other slots become empty (segment 0), and the tokens
        attend among themselves as without a cache (cache_index must be 0; `window` is not used). A server's
        prefill writes its requests straight into their slot rows this way.

    Returns:
      (hidden states float[B, T, D] after `ln_f` in the compute dtype, updated KVCache or None).
    """
    c = self.cfg
    t = x.shape[1]
    base = c.rope_base if rope_base is None else rope_base
    cos, sin = positional.rope_tables(positions, c.head_dim, base)
    q_scale = positional.logn_scale(positions, c.seq_length) if logn else None
    if cache is None or rows is not None:
      slots = jnp.arange(t, dtype=jnp.int32)
      mask = attention.segment_causal_mask(segment_ids, segment_ids, slots, slots)
      kv_segments = None
      if rows is not None:
        if cache is None or not isinstance(cache_index, int) or cache_index != 0:
          raise ValueError("a prompt fill (rows) needs a cache and cache_index=0")
        filled = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, cache.segment_ids.shape[1] - t)))
        kv_segments = cache.segment_ids.at[rows].set(filled, mode="drop")
    else:
      if cache_index is None:
        raise ValueError("decoding with a cache needs cache_index")
      b = x.shape[0]
      row_segments = write_slots(cache.segment_ids[:b], segment_ids.astype(jnp.int32), cache_index)
      q_slots = jnp.asarray(cache_index, jnp.int32)[..., None] + jnp.arange(t, dtype=jnp.int32)
      window = cache.segment_ids.shape[1] if window is None else window
      k_slots = jnp.arange(window, dtype=jnp.int32)
      mask = attention.segment_causal_mask(segment_ids, row_segments[:, :window], q_slots, k_slots)
      kv_segments = (row_segments if b == cache.segment_ids.shape[0]
                     else cache.segment_ids.at[:b].set(row_segments))
    x = sharding.constrain(x.astype(self.dtype), ("act_batch", "act_len", "act_embed"))

    # Without a cache (or filling rows) the mask is segment_causal_mask(segment_ids) over one sequence: kernels may
    # use the ids.
    seg_for_kernel = segment_ids if cache is None or rows is not None else None

    def block_fn(x, block, kv, key=None):
      return block(x, cos, sin, mask, q_scale, kv, cache_index, seg_for_kernel, key)

    if self.remat_policy != "none" and cache is None:
      block_fn = nnx.remat(block_fn, policy=layers.remat_policy(self.remat_policy), prevent_cse=False)

    if cache is None and dropout_key is not None:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"},
                unroll=self.scan_unroll)
      def run_dropout(x, block, key):
        return block_fn(x, block, None, key)[0]

      x = run_dropout(x, self.blocks, jax.random.split(dropout_key, c.layers))
      new_cache = None
    elif cache is None:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"},
                unroll=self.scan_unroll)
      def run(x, block):
        return block_fn(x, block, None)[0]

      x = run(x, self.blocks)
      new_cache = None
    else:
      # The cache is laid out by the rules (rows over the batch axes, heads over `tensor`, like the attention
      # that reads it), not left to propagation: a replicated cache would be all-gathered into every step.
      entries = tuple(sharding.constrain(e, KV_AXES) for e in
                      (cache.k, cache.v) + ((cache.k_scale, cache.v_scale) if cache.quantized else ()))

      # The stacked cache rides in the carry and each layer updates its own slice in place: scanned as xs -> ys
      # it would be read from one buffer and written to another, a whole extra cache in temporaries (4 GiB at
      # batch 4 x 2048 slots in bf16, planning/inference_plan.py).
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run_cached(carry, block):
        x, entries, layer = carry
        x, entries = block_fn(x, block, (entries, layer, window, rows))
        return x, entries, layer + 1

      x, entries, _ = run_cached((x, entries, jnp.int32(0)), self.blocks)
      entries = tuple(sharding.constrain(e, KV_AXES) for e in entries)
      new_cache = KVCache(*entries[:2], kv_segments, *entries[2:])
    return sharding.constrain(self.ln_f(x), ("act_batch", "act_len", "act_embed")), new_cache
