"""Attention core shared by the ViT, the resampler and the decoder: masks and scaled dot-product attention.

Letters: B batch, T query length, S key length, N heads, H head dim.

Masks are boolean `[B, 1, T, S]` (True = may attend). Decoder masks come from segment ids and slot indices, which
covers training rows (causal, one or several packed examples, right padding), left-padded prefill, and KV-cache
decoding with one rule: query slot t sees key slot s iff both are in the same non-zero segment and s <= t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_causal_mask(q_segments: jax.Array, k_segments: jax.Array,
                        q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
  """bool[B, 1, T, S] for causal attention within segments.

  Args:
    q_segments: int32[B, T], 0 marks padding (a padding query sees nothing; its output is never used).
    k_segments: int32[B, S], 0 marks padding or empty cache slots (never a key).
    q_slots: int32[T] or [B, T], absolute index of each query in the key sequence.
    k_slots: int32[S] or [B, S], absolute index of each key.
  """
  if q_slots.ndim == 1:
    q_slots = q_slots[None, :]
  if k_slots.ndim == 1:
    k_slots = k_slots[None, :]
  same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
  causal = k_slots[:, None, :] <= q_slots[:, :, None]
  return (same & causal)[:, None, :, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
                          scale: float, impl: str = "xla") -> jax.Array:
  """Softmax(q k^T * scale) v with heads kept separate.

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H] in the compute dtype.
    mask: bool broadcastable to [B, N, T, S] or None (full attention).
    scale: multiplies the scores (1/sqrt(H) or the reference's bf16-rounded variant).
    impl: "xla" (einsum; any backend) or "cudnn" (fused kernel on NVIDIA GPUs).

  Returns:
    [B, T, N, H] in q.dtype. Scores and softmax run in float32; the probabilities are cast to the compute dtype
    before the value matmul, as the reference's bf16 softmax output is.
  """
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)
