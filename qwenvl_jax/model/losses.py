"""Token cross-entropy, shared by training (the loss) and inference (likelihood scoring), whole or chunked.

Letters: B rows, T tokens, V vocabulary, C tokens per chunk, K = ceil(T / C) chunks, D LLM width.

Logits are upcast to float32 before the log-softmax (bf16 logits would lose the small differences between the
options of a multiple-choice question, and the training loss is reported in float32); the cross-entropy itself is
`optax.losses.softmax_cross_entropy_with_integer_labels` (logsumexp minus the target logit).

Chunked (`chunked_*`, from the final hidden states and the `lm_head` kernel): at full size the `[B, T, 151936]` logits
upcast to float32 are the largest activation of a training step (about 10 GB per chip at the stage-2 micro-batch on
v5p-128), and their gradient is another buffer of the same size. Here the `lm_head` matmul, the float32 log-softmax and
the pick of the target logit run inside a `lax.scan` over K sequence chunks, and the chunk body is `jax.checkpoint`ed
with nothing saved: the forward pass keeps only the per-token losses, the backward pass recomputes one chunk's
`[B, C, V]` logits at a time and turns them into that chunk's hidden-state gradient and its share of the `lm_head`
kernel gradient (accumulated by the scan in the kernel's dtype, float32 for a float32 parameter). Peak memory of the
loss is then a few `[B, C, V]` buffers instead of several `[B, T, V]` ones; compute is one extra `lm_head` matmul (the
recomputation).

Numerics are those of `QwenLM.lm_head` followed by the float32 cross-entropy: logits are computed in the compute
dtype `dtype` (bf16 at scale) from the kernel cast to it, then upcast before the log-softmax. Chunking only splits
the T axis, so every logit is the same dot product as in the unchunked path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qwenvl_jax import sharding


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy float32[B, T] of logits float[B, T, V] (any float dtype) against targets int[B, T].

  Pure and jit-able; `targets` must lie in [0, V).
  """
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                targets.astype(jnp.int32))


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked token cross-entropy in float32, as a sum and a count (so micro-batches add up exactly).

  Args:
    logits: float[B, T, V] (any float dtype; upcast before the log-softmax).
    targets: int32[B, T], already shifted by the pipeline.
    loss_mask: float32[B, T], 1 where the target is supervised.

  Returns:
    (sum of masked losses float32[], number of supervised tokens float32[]).
  """
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits, targets) * mask), jnp.sum(mask)


def chunked_token_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *,
                                chunk_size: int = 512, dtype=None) -> jax.Array:
  """Per-token cross-entropy float32[B, T] of the logits `hidden @ kernel`, C = `chunk_size` tokens at a time.

  Args:
    hidden: float[B, T, D] final hidden states (the `lm_head` input, `QwenVL.features`).
    kernel: float[D, V] the `lm_head` kernel (any float dtype; cast to `dtype` for the matmul, as `lm_head` does).
    targets: int32[B, T] target ids.
    chunk_size: C, tokens per chunk (>= 1); T is padded up to a multiple of C (padded tokens are dropped).
    dtype: matmul dtype (default: hidden's dtype).

  Returns:
    float32[B, T]: logsumexp(logits) - logits[target], differentiable w.r.t. hidden and kernel.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  b, t, d = hidden.shape
  dtype = jnp.dtype(dtype or hidden.dtype)
  c = min(chunk_size, t)
  k = -(-t // c)
  if k * c != t:
    hidden = jnp.pad(hidden, ((0, 0), (0, k * c - t), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, k * c - t)))
  # [K, B, C, ...]: the scan runs over chunks; the row axis keeps its data-parallel sharding.
  hs = jnp.swapaxes(hidden.reshape(b, k, c, d), 0, 1)
  ts = jnp.swapaxes(targets.astype(jnp.int32).reshape(b, k, c), 0, 1)

  # Nothing saved: the backward pass recomputes the chunk's logits rather than keeping K of them alive.
  @jax.checkpoint
  def chunk_losses(h, tgt, w):
    logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), w.astype(dtype))
    logits = sharding.constrain(logits, ("act_batch", "act_len", "act_vocab"))
    return token_cross_entropy(logits, tgt)

  def body(carry, xs):
    return carry, chunk_losses(xs[0], xs[1], kernel)

  _, losses = jax.lax.scan(body, None, (hs, ts))
  return jnp.swapaxes(losses, 0, 1).reshape(b, k * c)[:, :t]


def chunked_cross_entropy_sum(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                              chunk_size: int = 512, dtype=None) -> tuple[jax.Array, jax.Array]:
  """Masked token cross-entropy of `hidden @ kernel` without the full logits (see `chunked_token_cross_entropy`).

  Args:
    hidden: float[B, T, D]; kernel: float[D, V]; targets: int32[B, T] (already shifted by the pipeline);
    loss_mask: float32[B, T], 1 where the target is supervised; chunk_size, dtype: as
    `chunked_token_cross_entropy`.

  Returns:
    (sum of masked losses float32[], number of supervised tokens float32[]) — the contract of
    `cross_entropy_sum`.
  """
  losses = chunked_token_cross_entropy(hidden, kernel, targets, chunk_size=chunk_size, dtype=dtype)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)
