"""Next-token selection with different settings in every row: the decode slots of a server hold requests that each
chose their own temperature, top-k, top-p and seed.

Letters: B rows (decode slots), V vocabulary.

`inference.sampling` takes its knobs as static Python values (one compiled loop per setting, right for a batch
job where every row shares them). A server cannot recompile when a request asks for top_p=0.8, so here the knobs
are traced per-row arrays and one compiled step serves every mix of settings:
  * temperature 0 means greedy (argmax), > 0 samples from softmax(logits / temperature);
  * top-k keeps the k largest logits of the row and every logit tied with the k-th (0 = off), as
    `sampling.top_k_filter`;
  * top-p keeps the most likely tokens whose mass before them is below p (at least one; 1 = off), as
    `sampling.top_p_filter`, except that a logit tied with the last kept one is kept too (a threshold on the
    sorted logits instead of a scatter of the sorted mask; ties are measure-zero for real models);
  * min-p keeps the tokens at least min_p times as likely as the most likely one (0 = off; vLLM's, after
    temperature);
  * before all of these, `penalize` applies a request's repetition, frequency and presence penalties (vLLM's
    order and definitions) to the tokens its prompt and answer hold so far;
  * each row draws with its own key `fold_in(key(seed), n)`, n = tokens it generated so far, so a request's
    sample depends on its seed and nothing else (not on its slot or its neighbours). A seed is any 64-bit integer
    (OpenAI's `seed` is an int64), carried as two uint32 words: the threefry key of seed mod 2^64, which is
    `jax.random.key(seed)` for seeds below 2^32 (and for every int64 seed under jax_enable_x64), so seeds that
    differ only above bit 32 draw differently.
Sorting the vocabulary is skipped entirely (`lax.cond`) when every row is greedy.

`token_logprobs` gives what OpenAI's `logprobs` / `top_logprobs` return: the log-probability of each chosen token
and of the row's most likely tokens under the model's own distribution (the logits before temperature, top-k and
top-p, as vLLM's default `raw_logprobs`), computed only when some row asks for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenvl_jax.inference import sampling


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # inclusive: int64 and uint64 seeds alike
TOP_LOGPROBS = 20  # the most alternatives per token `token_logprobs` returns (OpenAI's top_logprobs limit)


def seed_words(seed: int) -> tuple[int, int]:
  """(high, low) uint32 words of a 64-bit seed (taken mod 2^64: -1 is 2^64 - 1); ValueError outside SEED_RANGE."""
  if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
    raise ValueError(f"seed must be a 64-bit integer, got {seed}")
  seed %= 2 ** 64
  return seed >> 32, seed & 0xFFFFFFFF


def row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
  """Typed PRNG keys [B]: `fold_in(key(seed_b), count_b)` (uint32[B, 2] seed words from `seed_words`, int32
  counts)."""
  keys = jax.random.wrap_key_data(seeds.astype(jnp.uint32), impl="threefry2x32")
  return jax.vmap(jax.random.fold_in)(keys, counts)


def _limited(logits: jax.Array, vocab_limit: int | None) -> jax.Array:
  """float32 logits with the ids at or past `vocab_limit` at -inf (never produced)."""
  logits = logits.astype(jnp.float32)
  if vocab_limit is not None and vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1])[None, :] < vocab_limit, logits, -jnp.inf)
  return logits


def _filter_row(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                min_p: jax.Array) -> jax.Array:
  """One row float32[V] warped by temperature, min-p, top-k and top-p (filtered entries -inf)."""
  logits = logits / jnp.maximum(temperature, 1e-6)
  logits = jnp.where((min_p > 0) & (logits < jnp.max(logits) + jnp.log(jnp.maximum(min_p, 1e-30))), -jnp.inf, logits)
  desc = jnp.sort(logits)[::-1]
  kth = desc[jnp.clip(top_k - 1, 0, logits.shape[0] - 1)]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  desc = jnp.where((top_k > 0) & (desc < kth), -jnp.inf, desc)
  probs = jax.nn.softmax(desc)
  mass_before = jnp.cumsum(probs) - probs
  keep = (mass_before < top_p).at[0].set(True)
  threshold = jnp.min(jnp.where(keep, desc, jnp.inf))
  return jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)


def select(logits: jax.Array, *, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seeds: jax.Array,
           counts: jax.Array, min_p: jax.Array, vocab_limit: int | None = None) -> jax.Array:
  """int32[B] next tokens.

  Args:
    logits: float[B, V] at each row's last position.
    temperature: float32[B], 0 = greedy. top_k: int32[B], 0 = off. top_p: float32[B] in (0, 1], 1 = off.
    min_p: float32[B] in [0, 1], 0 = off.
    seeds: uint32[B, 2] per-request seeds (`seed_words`); counts: int32[B] tokens each row generated so far (the
      key's fold-in).
    vocab_limit: ids >= this are never produced (the tokenizer's size when the model has padding rows); static.
  """
  logits = _limited(logits, vocab_limit)
  greedy = sampling.greedy_tokens(logits)

  def sample(_):
    warped = jax.vmap(_filter_row)(logits, temperature, top_k, top_p, min_p)
    drawn = jax.vmap(jax.random.categorical)(row_keys(seeds, counts), warped).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)


def token_scores(logits: jax.Array, chosen: jax.Array, vocab_limit: int | None = None,
                 rank: bool = False) -> tuple[jax.Array, ...]:
  """What `token_logprobs` returns for every row, computed unconditionally (logits float[N, V], chosen int32[N]):
  the scores of rows a caller has already chosen to score (e.g. a prompt's positions, `slot_programs`). rank: also
  int32[N] each chosen token's rank in its row's distribution (1 = the most likely; vLLM's `rank`)."""
  v = logits.shape[-1]
  n = min(TOP_LOGPROBS, v if vocab_limit is None else min(v, vocab_limit))
  # Normalized over the model's whole vocabulary, as the reference's evaluation (and `inference.scoring`, and
  # vLLM's logprobs) compute a token's probability; only the alternatives skip the ids past the tokenizer's.
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  top_lp, top_ids = jax.lax.top_k(_limited(logp, vocab_limit), n)
  pad = TOP_LOGPROBS - n  # a vocabulary smaller than TOP_LOGPROBS: padded with -inf, never shown
  chosen_lp = jnp.take_along_axis(logp, chosen[:, None].astype(jnp.int32), axis=-1)[:, 0]
  out = (chosen_lp, jnp.pad(top_ids.astype(jnp.int32), ((0, 0), (0, pad))),
         jnp.pad(top_lp, ((0, 0), (0, pad)), constant_values=-jnp.inf))
  if rank:
    out += (1 + jnp.sum(logp > chosen_lp[:, None], axis=-1, dtype=jnp.int32),)
  return out


def no_scores(rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zeros in `token_scores`' shapes: what a skipped score returns."""
  return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, TOP_LOGPROBS), jnp.int32),
          jnp.zeros((rows, TOP_LOGPROBS), jnp.float32))


def token_logprobs(logits: jax.Array, chosen: jax.Array, wanted: jax.Array,
                   vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The model's log-probabilities of the chosen tokens and of each row's `TOP_LOGPROBS` most likely tokens.

  Args:
    logits: float[B, V] at each row's last position (the raw logits `select` was given).
    chosen: int32[B] the tokens `select` picked.
    wanted: bool[B] rows whose request asked for log-probabilities; when none did, nothing is computed (`lax.cond`)
      and every output is zero.
    vocab_limit: as `select`'s: ids past it are never among the top ones (they are never produced).

  Returns:
    (float32[B] log p(chosen), int32[B, TOP_LOGPROBS] the most likely ids, most likely first, float32[B,
    TOP_LOGPROBS] their log-probabilities). Each is the log-softmax of the float32 logits over the model's whole
    vocabulary (the padded ids past the tokenizer's included, as the reference's evaluation computes it), before
    temperature, top-k and top-p: what the model says, not what the sampling settings made of it.
  """
  return jax.lax.cond(jnp.any(wanted), lambda _: token_scores(logits, chosen, vocab_limit),
                      lambda _: no_scores(logits.shape[0]), None)


def add_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
  """float32 logits[B, V] plus each row's logit bias (OpenAI's `logit_bias`): ids int32[B', M] (entries >= V are
  padding, dropped) and values float32[B', M], B' >= B, the first B rows the logits' (a server decodes its first
  rows). When no row has a bias the logits are returned as they are (`lax.cond`)."""
  b = logits.shape[0]

  def apply(_):
    return logits.at[jnp.arange(b)[:, None], ids[:b]].add(values[:b], mode="drop")

  return jax.lax.cond(jnp.any(values[:b] != 0), apply, lambda _: logits, None)


def hold_stops(logits: jax.Array, stops: jax.Array, hold: jax.Array) -> jax.Array:
  """float32 logits[B, V] with -inf where bool stops[B', V] (B' >= B, the first B rows the logits') in the rows where
  bool hold[B] (vLLM's `min_tokens`: the ids that would end a request cannot be picked before it has generated that
  many tokens). A select XLA fuses with the logits' other elementwise work: no `lax.cond`. A scatter of [B, 64] stop
  ids under a cond of its own, even skipped, made the tiny model's one-row decode step on CPU 0.21-0.23 ms against
  0.16-0.19."""
  return jnp.where(hold[:, None] & stops[:logits.shape[0]], -jnp.inf, logits)


def penalize(logits: jax.Array, seen: jax.Array, counts: jax.Array, *, repetition: jax.Array,
             frequency: jax.Array, presence: jax.Array) -> jax.Array:
  """float32 logits[B, V] with each row's penalties on the tokens it holds (vLLM's definitions and order):

    repetition (HF's repetition_penalty; 1 = off): a token of the prompt or the answer so far has its logit divided
      by it when positive, multiplied when not;
    frequency, presence (OpenAI's, in [-2, 2]; 0 = off): logit - frequency * (times the answer holds the token)
      - presence * (the answer holds it).

  seen: bool[B', V] tokens of each row's prompt; counts: int32[B', V] of its answer so far; B' >= B, the first B
  rows are the logits' (a server decodes its first rows). When no row has a penalty the logits are returned as they
  are (`lax.cond`: nothing is read or computed).
  """
  def apply(_):
    b = logits.shape[0]
    held = seen[:b] | (counts[:b] > 0)
    r = repetition[:, None]
    out = jnp.where(held, jnp.where(logits > 0, logits / r, logits * r), logits)
    c = counts[:b].astype(jnp.float32)
    return out - frequency[:, None] * c - presence[:, None] * (c > 0)

  any_penalty = jnp.any((repetition != 1) | (frequency != 0) | (presence != 0))
  return jax.lax.cond(any_penalty, apply, lambda _: logits, None)
