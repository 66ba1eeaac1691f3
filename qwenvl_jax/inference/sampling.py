"""Next-token selection: the logits processors of the reference's `generate` and the sampling warpers.

Letters: B rows, V vocabulary, L tokens in the buffer, K length of a stop sequence.

Per decoding step the reference (transformers `generate` + Qwen's `StopWordsLogitsProcessor`, SPEC §4.4–4.5)
transforms the last position's logits in this order, which `select_tokens` reproduces:
  1. `min_new_tokens`: while fewer new tokens exist, `<|endoftext|>` gets -inf;
  2. stop words: when the token buffer ends with a stop sequence, the `<|endoftext|>` logit is set to 2**15,
     forcing end-of-text next (Gotcha 24);
  3. greedy: argmax; sampling: temperature, then top-k (ties with the k-th kept), then top-p (the smallest set of
     most likely tokens whose mass reaches p, at least one), then a categorical draw.
Rows that already finished emit the pad id. All functions are pure and jit-able; the knobs that change shapes
or control flow (top_k, whether to sample, the stop sequences) are static Python values.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# The reference forces end-of-text with this logit (`float(2**15)`), not +inf, so a row whose logits are all
# -inf except this one still samples it with probability 1.
FORCED_LOGIT = float(2 ** 15)


def mask_vocab(logits: jax.Array, vocab_limit: int | None) -> jax.Array:
  """float32[B, V] with ids >= vocab_limit at -inf (rows past the tokenizer's vocabulary are never produced)."""
  if vocab_limit is None or (isinstance(vocab_limit, int) and vocab_limit >= logits.shape[-1]):
    return logits
  ids = jnp.arange(logits.shape[-1])
  return jnp.where(ids[None, :] < vocab_limit, logits, -jnp.inf)


def suppress_eos(logits: jax.Array, eos_id: int, active: jax.Array) -> jax.Array:
  """float32[B, V] with the eos logit at -inf where `active` (bool scalar or [B]), as `min_new_tokens` does."""
  active = jnp.broadcast_to(active, logits.shape[:1])
  return logits.at[:, eos_id].set(jnp.where(active, -jnp.inf, logits[:, eos_id]))


def ends_with(tokens: jax.Array, end: jax.Array, sequence: Sequence[int]) -> jax.Array:
  """bool[B]: whether tokens[:, :end + 1] ends with `sequence` (false when the buffer is shorter).

  tokens: int32[B, L]; end: int32 scalar slot of the last token to look at.
  """
  k = len(sequence)
  start = end - k + 1
  window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(start, 0), k, axis=1)
  match = jnp.all(window == jnp.asarray(sequence, tokens.dtype)[None, :], axis=1)
  return match & (start >= 0)


def force_stop_words(logits: jax.Array, tokens: jax.Array, end: jax.Array,
                     stop_words: Sequence[Sequence[int]], eos_id: int) -> jax.Array:
  """The reference's `StopWordsLogitsProcessor`: rows whose buffer ends with a stop sequence get eos = 2**15.

  Stop sequences equal to `[eos_id]` are ignored (generation stops on eos anyway), as the reference filters them
  (`GenerationConfig` drops them before tracing, when `eos_id` may be a traced value).
  """
  hit = jnp.zeros(logits.shape[:1], bool)
  for seq in stop_words:
    if isinstance(eos_id, int) and list(seq) == [eos_id]:
      continue
    hit = hit | ends_with(tokens, end, seq)
  return logits.at[:, eos_id].set(jnp.where(hit, FORCED_LOGIT, logits[:, eos_id]))


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (and any tied with the k-th), the rest -inf; k <= 0 is a no-op."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][:, -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps, per row, the most likely tokens until their probability mass reaches p.

  A token is kept when the mass of the strictly more likely tokens (in sorted order) is below p, so the most
  likely token always survives; p >= 1 is a no-op (as transformers' `TopPLogitsWarper`).
  """
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < p
  keep_sorted = keep_sorted.at[:, 0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def warp(logits: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Temperature, then top-k, then top-p on float32[B, V] (the order of transformers' warpers)."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use greedy decoding instead)")
  if temperature != 1.0:
    logits = logits / temperature
  return top_p_filter(top_k_filter(logits, top_k), top_p)


def greedy_tokens(logits: jax.Array) -> jax.Array:
  """int32[B]: the index of each row's largest logit, the first one on ties (as `jnp.argmax`).

  Written as a max and a min over the indices that reach it: `jnp.argmax` lowers to one variadic (value, index)
  reduction, which XLA:CPU runs as a scalar loop, 5-6 us per row of a 1024-entry vocabulary; at 16 decode rows that
  was a tenth of the tiny model's whole decode step (bench/bench_serve_step.py). Two plain reductions vectorize.
  A row holding NaN gives its last index (argmax would give the first NaN's): such a row has no greedy token.
  """
  v = logits.shape[-1]
  best = jnp.max(logits, axis=-1, keepdims=True)
  index = jnp.min(jnp.where(logits == best, jnp.arange(v, dtype=jnp.int32), v - 1), axis=-1)
  return index.astype(jnp.int32)


def select_tokens(logits: jax.Array, key: jax.Array | None, *, tokens: jax.Array, end: jax.Array,
                  num_generated: jax.Array, done: jax.Array, greedy: bool, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, eos_id: int | jax.Array, pad_id: int | jax.Array,
                  min_new_tokens: int | jax.Array = 0, stop_words: Sequence[Sequence[int]] = (),
                  vocab_limit: int | jax.Array | None = None) -> jax.Array:
  """The next token of every row, int32[B].

  Args:
    logits: float[B, V] at the last position.
    key: PRNG key (unused when greedy).
    tokens: int32[B, L] buffer (prompt then generated tokens) and `end` the slot of its last token, for the
      stop-word check.
    num_generated: int32 scalar, new tokens so far (for `min_new_tokens`).
    done: bool[B], rows that already produced eos: they get `pad_id`.
    greedy, temperature, top_k, top_p: the decoding mode (see module docstring).
    eos_id, pad_id, min_new_tokens, stop_words, vocab_limit: see `decode.GenerationConfig`; the ids, the
      minimum and the limit may be traced int32 scalars (one compiled loop serves them all).
  """
  logits = mask_vocab(logits.astype(jnp.float32), vocab_limit)
  if not isinstance(min_new_tokens, int) or min_new_tokens > 0:
    logits = suppress_eos(logits, eos_id, num_generated < min_new_tokens)
  if stop_words:
    logits = force_stop_words(logits, tokens, end, stop_words, eos_id)
  if greedy:
    next_tokens = greedy_tokens(logits)
  else:
    next_tokens = jax.random.categorical(key, warp(logits, temperature=temperature, top_k=top_k, top_p=top_p))
  return jnp.where(done, pad_id, next_tokens).astype(jnp.int32)
