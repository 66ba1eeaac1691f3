"""Attention core shared by the ViT, the resampler and the decoder: masks and scaled dot-product attention.

Letters: B batch, T query length, S key length, N heads, H head dim.

Masks are boolean `[B, 1, T, S]` (True = may attend). Decoder masks come from segment ids and slot indices, which
covers training rows (causal, one or several packed examples, right padding), left-padded prefill, and KV-cache
decoding with one rule: query slot t sees key slot s iff both are in the same non-zero segment and s <= t.

Implementations (`QwenVLConfig.attention_impl`): "xla" (einsums, any backend, the reference numerics), "xla_rows"
(the same einsums one batch row at a time, for CPUs; see `_rows`), "cudnn" (fused kernel, NVIDIA GPUs) and
"splash" (Pallas splash attention, TPU; see kernels.py). Splash handles the
unmasked ViT/resampler calls and square decoder masks (training and prefill without a cache offset); calls with a
KV cache (T != S) keep the xla path. The decoder passes its segment ids, which splash takes directly; a caller that
gives only a boolean mask gets labels recovered from it (`segment_labels_from_mask`) with a check that the mask is
what those labels and causality give; a mask that is not segment-causal turns the output into NaN (a loud failure:
training stops on a NaN loss) instead of being silently replaced by a different one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwenvl_jax.model import kernels, layers

IMPLS = ("xla", "xla_rows", "cudnn", "splash")
# Inference's xla attention of a long prompt runs over blocks of this many queries, one at a time (`lax.map`): a
# layer's float32 scores are [B, N, QUERY_BLOCK, S] at a time, not [B, N, T, S] (T = S = 8192: 8 GiB per layer and
# row with the 7B model's 32 heads, 0.5 GiB in blocks). Each query's softmax is over its whole row of keys either
# way, so the values are the unblocked ones (tests/model/test_attention.py). Training keeps the whole square (its
# backward pass would save every block's probabilities anyway).
QUERY_BLOCK = 512


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
                          scale: float, impl: str = "xla", segment_ids: jax.Array | None = None) -> jax.Array:
  """Softmax(q k^T * scale) v with heads kept separate.

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H] in the compute dtype.
    mask: bool broadcastable to [B, N, T, S] or None (full attention).
    scale: multiplies the scores (1/sqrt(H) or the reference's bf16-rounded variant).
    impl: "xla" (einsum; any backend), "cudnn" (fused kernel on NVIDIA GPUs) or "splash" (Pallas, TPU).
    segment_ids: optional int32[B, T] when `mask` is exactly `segment_causal_mask` of these ids over one sequence
      (T == S, 0 = padding): the splash kernel then takes them directly instead of rebuilding labels from the mask.

  Returns:
    [B, T, N, H] in q.dtype. Scores and softmax run in float32; the probabilities are cast to the compute dtype
    before the value matmul, as the reference's bf16 softmax output is. With "splash", rows of padding queries
    (no visible key) hold other finite values than with "xla"; their outputs are never used.

  Raises:
    ValueError: an unknown impl, or a kernel asked for on a backend it cannot run on (kernels.py).
  """
  if impl == "cudnn":
    return kernels.cudnn_attention(q, k, v, mask=mask, scale=scale)
  if impl == "splash":
    return _splash(q, k, v, mask=mask, scale=scale, segment_ids=segment_ids)
  if impl == "xla_rows":
    return _rows(q, k, v, mask=mask, scale=scale)
  if impl != "xla":
    raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")
  scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def by_query_blocks(fn, q: jax.Array, mask: jax.Array) -> jax.Array:
  """`fn(q, mask)` (an attention of q [B, T, N, H] under mask [B, 1, T, S] -> [B, T, N, H]) over blocks of
  `QUERY_BLOCK` queries, one block at a time; `fn(q, mask)` itself when T is at most one block or not a multiple
  of it."""
  b, t = q.shape[:2]
  c = QUERY_BLOCK
  if t <= c or t % c:
    return fn(q, mask)
  n = t // c
  blocks = jnp.moveaxis(q.reshape((b, n, c) + q.shape[2:]), 1, 0)  # [n, B, c, N, H]
  mask = jnp.broadcast_to(mask, (b,) + mask.shape[1:])
  masks = jnp.moveaxis(mask.reshape(mask.shape[:2] + (n, c, mask.shape[-1])), 2, 0)  # [n, B, 1, c, S]
  out = jax.lax.map(lambda block: fn(*block), (blocks, masks))
  return jnp.moveaxis(out, 0, 1).reshape(q.shape[:2] + out.shape[3:])


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array, scale: float,
                      impl: str = "xla", segment_ids: jax.Array | None = None) -> jax.Array:
  """`dot_product_attention` of a prompt among its own tokens at inference (the serving engine's prefill,
  `qwen.QwenLM.features`' rows): the xla path over blocks of queries (`by_query_blocks`), a kernel as it is."""
  if impl not in ("xla", "xla_rows"):  # xla_rows is a training-time CPU option: inference runs xla
    return dot_product_attention(q, k, v, mask=mask, scale=scale, impl=impl, segment_ids=segment_ids)
  return by_query_blocks(lambda qb, mb: dot_product_attention(qb, k, v, mask=mb, scale=scale), q, mask)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array, scale: float,
                    impl: str = "xla") -> jax.Array:
  """`dot_product_attention` of new queries against a KV cache stored heads-major (`qwen.KVCache`).

  Args:
    q: [B, T, N, H]; k, v: [B, N, S, H] (the cache's layout) in the compute dtype.
    mask, scale, impl: as `dot_product_attention`.

  Returns:
    [B, T, N, H] in q.dtype, equal to `dot_product_attention` of the same keys in [B, S, N, H].

  The xla path contracts the cache as it is stored: batch dims (B, N) lead, so neither einsum relayouts the whole
  cache (with keys stored [B, S, N, H] both did, every step: the decode step's largest cost on CPU), and a long
  prompt's queries go in blocks (`by_query_blocks`). The kernels take [B, S, N, H] and get a transposed copy.
  """
  if impl not in ("xla", "xla_rows"):  # xla_rows is a training-time CPU option; decode reads the cache as stored
    return dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask, scale=scale, impl=impl)

  def attend(q, mask):
    scores = jnp.einsum("btnh,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsh->btnh", probs, v)

  return by_query_blocks(attend, q, mask)


def _rows(q, k, v, *, mask, scale):
  """Attention one batch row at a time for CPUs: `lax.map` over B, each row rematerialized in the backward pass.

  On a CPU the "xla" path writes the whole [B, N, T, S] float32 scores, exponentials and probabilities to memory
  and reads them back several times (forward, then backward): at the tiny preset's batch 16 that is 16 MB per
  ViT layer per pass, and these passes, not the FLOPs, made the step scale worse than PyTorch's with the batch
  (PyTorch's CPU `scaled_dot_product_attention` is a fused, blocked kernel that never materializes them). Here
  one row's [N, T, S] block (0.5 MB for the tiny ViT, 1.5 MB for `small`) stays in the core's cache between the
  ops that produce and consume it, and `jax.checkpoint` keeps the loop from saving every row's block for the
  backward pass (it recomputes it from q and k: one extra q k^T per row, flash attention's trade). Within a row
  the heads lead ([N, T, H]: plain batched matmuls, no layout copies of the block), and the softmax is
  normalized after the value matmul (o = (e v) / sum(e), e = exp(s - max s)), as flash attention does: one
  division per output element instead of one per score. Measured for one tiny-ViT layer at batch 16 (32 images,
  forward + backward, one core): "xla" 58-63 ms, this 21 ms, PyTorch's fused kernel 13 ms.

  Numerics: in float32 equal to "xla" up to rounding (tests/model/test_attention.py); with a bf16 compute dtype
  the exponentials are rounded to bf16 before the value matmul, which is not the reference's rounding of the
  normalized probabilities, so bf16 parity runs use "xla".
  """
  b = q.shape[0]
  row_mask = None if mask is None else jnp.broadcast_to(mask, (b,) + mask.shape[1:])

  @jax.checkpoint
  def one_row(row):
    qr, kr, vr, mr = row  # [T, N, H], [S, N, H], [S, N, H], [1, T, S] or None
    scores = _row_dot("nth,nsh->nts", qr.transpose(1, 0, 2), kr.transpose(1, 0, 2)) * scale
    if mr is not None:
      scores = jnp.where(mr, scores, jnp.finfo(jnp.float32).min)
    # The shift only keeps exp finite; the result does not depend on it, so it carries no gradient.
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = _row_dot("nts,nsh->nth", e.astype(vr.dtype), vr.transpose(1, 0, 2))
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out.transpose(1, 0, 2).astype(qr.dtype)

  return jax.lax.map(one_row, (q, k, v, row_mask))


# The row attention's two products: spec -> (the spec of d(first operand) from (g, second operand), whether the
# key-side gradient contracts (g, first) or (first, g)). scores = q k^T: dk = g^T q; values = e v: dv = e^T g.
_ROW_DOTS = {"nth,nsh->nts": ("nts,nsh->nth", True), "nts,nsh->nth": ("nth,nsh->nts", False)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _row_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(spec, a, b) in float32 for a spec of `_ROW_DOTS`; the key-side gradient (dk or dv) by
  `layers.contract_rows`, as JAX's own transpose rule gives it the slow layout."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _row_dot_fwd(spec, a, b):
  return _row_dot(spec, a, b), (a, b)


def _row_dot_bwd(spec, res, g):
  a, b = res
  da_spec, g_first = _ROW_DOTS[spec]
  da = jnp.einsum(da_spec, g, b, preferred_element_type=jnp.float32)
  # dk = ds^T q and dv = e^T do contract the query axis; laid out [N, S, H] (JAX's own rule) XLA:CPU runs them
  # ~4.5x slower than as [N, H, S] (one tiny-ViT row, [2, 256, 16] from [2, 256, 256] and [2, 256, 16], one
  # thread: 162 against 36 us), so they are flipped whenever keys outnumber the head dimension.
  first, second = (g, a) if g_first else (a, g)
  db = layers.contract_rows(first, second, flip=first.shape[2] > second.shape[2],
                            preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_row_dot.defvjp(_row_dot_fwd, _row_dot_bwd)


def segment_labels_from_mask(mask: jax.Array) -> jax.Array:
  """int32[B, T] labels with mask == (label_t == label_s) & (s <= t) on every row that sees a key.

  Args:
    mask: bool[B, 1, T, T] from `segment_causal_mask` over one sequence (equal query and key slots).

  Returns:
    For a query that sees keys, the index of the first key it sees: the first token of its segment, the same
    for all tokens of that segment and for no other. -1 for queries that see nothing (padding): they see each
    other causally instead, so no row is empty (the kernel would divide by zero and put NaN into dk, dv).
  """
  rows = mask[:, 0]
  return jnp.where(rows.any(axis=-1), jnp.argmax(rows, axis=-1), -1).astype(jnp.int32)


def _splash(q, k, v, *, mask, scale, segment_ids=None):
  """The splash path of `dot_product_attention` (same arguments)."""
  if mask is None:
    return kernels.splash_attention(q, k, v, scale=scale, causal=False)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  if t != s or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2:] != (t, s):
    # A KV cache (a few queries against the whole cache) or a per-head mask: no causal square for the kernel
    # to tile; xla gives the same result.
    return dot_product_attention(q, k, v, mask=mask, scale=scale, impl="xla")
  if segment_ids is not None:
    # Exact by construction: causal within equal ids. Padding (id 0) queries see earlier padding, so no kernel row
    # is empty, and real tokens never see padding; padding outputs are never used.
    seg = segment_ids.astype(jnp.int32)
    return kernels.splash_attention(q, k, v, scale=scale, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
  labels = jnp.broadcast_to(segment_labels_from_mask(mask), (b, t))
  out = kernels.splash_attention(q, k, v, scale=scale, causal=True, q_segment_ids=labels, kv_segment_ids=labels)
  rows = mask[:, 0]
  slots = jnp.arange(t)
  rebuilt = (labels[:, :, None] == labels[:, None, :]) & (slots[None, :] <= slots[:, None])[None]
  faithful = jnp.all((rebuilt == rows) | ~rows.any(axis=-1, keepdims=True))
  return jnp.where(faithful, out, jnp.asarray(jnp.nan, out.dtype))
