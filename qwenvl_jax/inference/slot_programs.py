"""The device programs of continuous batching: B decode slots over one KV cache, and four programs on it (to be
jitted with the graphdef and static arguments bound: `serving.slots.SlotModel` runs them, `planning.inference_plan`
compiles them for a TPU topology).

Letters: B decode slots, C cache slots per row (the context limit), k requests joining in one prefill (padded to
a prefill-batch bucket), P padded prompt length (a length bucket), F image-feature buffer (images per prefill
group, padded), n images encoded in one call (an image-batch bucket), Q image tokens, D LLM width, V vocabulary,
L layers, S image side, K decode steps per call, W cache slots attended (a window bucket).

  encode(images uint8[n, S, S, 3])                     -> feats [F, Q, D] (ViT + adapter, zero-padded to F)
  prefill(cache, history, ids[k, P], lengths, first_image, feats, rows, ...) -> Picked [k] (first tokens; and the
                                                          prompts' scores, `PromptScores`, when asked), cache, history
  decode(cache, history, tokens[R], positions[R], active[R], ...) -> Picked [K, R] (new tokens), cache, history
                                                                                (the first R rows)
  copy_prompt(cache, history, src, dst)                -> cache, history (row dst holds row src's prompt)

`TokenHistory` holds, per slot row, which tokens its prompt holds and how often its answer has produced each (the
penalties of `slot_sampling.penalize` read them, skipped when no row has one), its request's logit bias (a few
hundred (id, bias) pairs, `slot_sampling.add_bias`) and the ids that end it, held back until it has generated its
`min_tokens` (`slot_sampling.hold_stops`): prefill sets a joining row's, decode counts each new token.

Every slot row of the cache belongs to one request at a time. A request's prompt occupies its row's slots
0 .. len-1 and its n-th new token slot len + n, so the cache slot equals the RoPE position and rows advance
independently (the model writes each row at its own `cache_index`, `qwen.write_layer_slots`). Prefill runs the
joining prompts right-padded (each row's last prompt position is its next-token logit, and only it goes through
`lm_head`) and writes each row into its slot row as it is, clearing the rest of the row (the previous occupant's keys
are never attended again: their segment ids are 0).

Shapes are fixed per (k, P) for prefill, per n for encode and per (R, W) for decode (R: a power of two covering the
highest busy slot, so one client costs a one-row step, not a B-row one; W: a bucket covering the furthest position
the call reaches, so short conversations do not read the whole cache), so a server warms them all up front and never
compiles again (`serving.engine.Engine`). A decode call runs K steps in one program (the token of step j feeds step
j + 1 on the device): the host's per-call work (dispatch, transfers, delivering tokens) is paid once per K tokens, as
the whole-loop `decode.Generator` pays it once per answer. Images are encoded in one call for every joining request
(any number per request, anywhere in its history); the k-th `<imgpad>` of a prompt takes feature k % Q of the
prompt's image k // Q, as `QwenVL.embed`. Dynamic NTK (per-row RoPE base, decided at prefill and kept) and logn
scaling are on, as in `decode.Generator`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import sharding
from qwenvl_jax.inference import slot_sampling
from qwenvl_jax.model.qwen import KV_AXES, SEGMENT_AXES, KVCache, constrain_cache


class Sampling(NamedTuple):
  """Per-row sampling settings (see `slot_sampling.select`): float32 temperature (0 = greedy), int32 top_k,
  float32 top_p, uint32[., 2] seed (`slot_sampling.seed_words`), int32 count (tokens generated so far), bool
  logprobs (the row's request wants log-probabilities, `slot_sampling.token_logprobs`), float32 min_p (0 = off),
  float32 repetition (1 = off), frequency and presence (0 = off) penalties (`slot_sampling.penalize`), bool
  prompt_logprobs (prefill scores the row's prompt tokens too, `prompt_scores`; decode ignores it), int32
  min_tokens (while count is below it, the row's `TokenHistory.stops` cannot be picked; 0 = off)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  count: jax.Array
  logprobs: jax.Array
  min_p: jax.Array
  repetition: jax.Array
  frequency: jax.Array
  presence: jax.Array
  prompt_logprobs: jax.Array
  min_tokens: jax.Array

  @classmethod
  def greedy(cls, rows: int) -> "Sampling":
    """Settings of `rows` greedy rows (temperature 0, no penalties, no log-probabilities), as host arrays: what
    tests and benches decode with."""
    zeros = np.zeros(rows, np.float32)
    return cls(zeros, np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros((rows, 2), np.uint32),
               np.zeros(rows, np.int32), np.zeros(rows, bool), zeros, np.ones(rows, np.float32), zeros, zeros,
               np.zeros(rows, bool), np.zeros(rows, np.int32))


# The most logit-bias entries one request may set (OpenAI's limit): each slot row keeps this many (id, bias) pairs.
MAX_LOGIT_BIAS = 300
# The most ids that end one request (the chat format's stop tokens and the request's own) a slot row can hold back
# until its request's `min_tokens` (vLLM's) are generated.
MAX_STOP_IDS = 64


class TokenHistory(NamedTuple):
  """Per slot row: bool seen[B, V] (the tokens of its prompt) and int32 counts[B, V] (how often its answer has
  produced each token so far), what the penalties read; its request's logit bias, int32 bias_ids[B,
  MAX_LOGIT_BIAS] (V = unused) with float32 bias_values (`slot_sampling.add_bias`); and bool stops[B, V], the ids
  held back until its `Sampling.min_tokens` (`slot_sampling.hold_stops`). The last three are set by its
  prefill."""
  seen: jax.Array
  counts: jax.Array
  bias_ids: jax.Array
  bias_values: jax.Array
  stops: jax.Array


def init_history(num_slots: int, vocab: int) -> TokenHistory:
  """An empty history (rows over the batch axes under `sharding.use_rules`); jit it, as the cache is."""
  return constrain_history(TokenHistory(jnp.zeros((num_slots, vocab), bool), jnp.zeros((num_slots, vocab), jnp.int32),
                                        jnp.full((num_slots, MAX_LOGIT_BIAS), vocab, jnp.int32),
                                        jnp.zeros((num_slots, MAX_LOGIT_BIAS), jnp.float32),
                                        jnp.zeros((num_slots, vocab), bool)))


def no_bias(rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Host arrays of `rows` requests without a logit bias: `prefill`'s bias_ids / bias_values."""
  return np.full((rows, MAX_LOGIT_BIAS), vocab, np.int32), np.zeros((rows, MAX_LOGIT_BIAS), np.float32)


def no_stops(rows: int, vocab: int) -> np.ndarray:
  """Host array of `rows` requests that hold back no id (no `min_tokens`): `prefill`'s stop_ids."""
  return np.full((rows, MAX_STOP_IDS), vocab, np.int32)


# Logical axes of every `TokenHistory` array: [B, V] or [B, MAX_LOGIT_BIAS], rows over the batch axes.
HISTORY_AXES = ("act_batch", None)


def constrain_history(history: TokenHistory) -> TokenHistory:
  return TokenHistory(*(sharding.constrain(x, HISTORY_AXES) for x in history))


class PromptScores(NamedTuple):
  """The prompts' own tokens scored by the model (`prompt_scores`), per row and prompt position t: float32[k, P]
  log p(token t | tokens before it), int32 / float32 [k, P, `slot_sampling.TOP_LOGPROBS`] the most likely ids at t
  and their log-probabilities, and int32[k, P] token t's rank there (1 = the most likely). Position 0 (nothing
  before it) and the padding hold zeros."""
  logprob: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array
  rank: jax.Array


class Picked(NamedTuple):
  """What a program picked per row: int32 tokens, and when some row asked (`Sampling.logprobs`, else zeros) the
  float32 log-probability of each token and int32 / float32 `[..., slot_sampling.TOP_LOGPROBS]` the most likely
  ids and their log-probabilities (`slot_sampling.token_logprobs`); prefill's also holds its prompts' scores
  (`PromptScores`; zeros unless some row asked, `Sampling.prompt_logprobs`), decode's None."""
  tokens: jax.Array
  logprob: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array
  prompt: PromptScores | None = None


# Prompt positions (all rows together) whose float32 logits one step of `prompt_scores` holds: 256 x 151,936 x 4
# bytes = 156 MB for the 7B model's vocabulary, not the k x P x V of the whole prompt.
PROMPT_SCORE_POSITIONS = 256


def prompt_scores(model, h: jax.Array, ids: jax.Array, wanted: jax.Array, vocab_limit) -> PromptScores:
  """`PromptScores` of prompts ids int32[k, P] from the last hidden states h [k, P, D] of prefill (position t's
  logits score token t + 1), `PROMPT_SCORE_POSITIONS` positions' logits at a time; computed only when some row is
  `wanted` (`lax.cond`, else zeros): what vLLM's `prompt_logprobs` and OpenAI's `echo` with `logprobs` return, and
  what lm-evaluation-harness scores a multiple-choice answer with."""
  k, p, d = h.shape
  top = slot_sampling.TOP_LOGPROBS

  def compute(_):
    c = min(p, max(1, PROMPT_SCORE_POSITIONS // k))
    steps = -(-p // c)
    pad = steps * c - p
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1 + pad)))
    hs = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(k, steps, c, d).swapaxes(0, 1)
    ts = targets.reshape(k, steps, c).swapaxes(0, 1)

    def chunk(args):
      hc, tc = args
      logits = model.llm.lm_head(hc).reshape(k * c, -1)
      return tuple(x.reshape(k, c, *x.shape[1:]) for x in slot_sampling.token_scores(logits, tc.reshape(-1),
                                                                                        vocab_limit, rank=True))

    out = jax.lax.map(chunk, (hs, ts))  # each [steps, k, c, ...]
    out = [x.swapaxes(0, 1).reshape(k, steps * c, *x.shape[3:])[:, :p - 1] for x in out]
    return PromptScores(*(jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2)) for x in out))

  def skip(_):
    return PromptScores(jnp.zeros((k, p), jnp.float32), jnp.zeros((k, p, top), jnp.int32),
                        jnp.zeros((k, p, top), jnp.float32), jnp.zeros((k, p), jnp.int32))

  return jax.lax.cond(jnp.any(wanted), compute, skip, None)


def _pick(logits, history: TokenHistory, sampling: Sampling, counts, vocab_limit) -> Picked:
  """Tokens of the logits after the logit bias (`slot_sampling.add_bias`), the stop ids held back before
  `min_tokens` (at the generated `counts`, `slot_sampling.hold_stops`) and the penalties
  (`slot_sampling.penalize`), in vLLM's order, with the rows' `history` (its first rows the logits'); and the
  log-probabilities of the logits before them (the model's, as vLLM's default)."""
  biased = slot_sampling.add_bias(logits.astype(jnp.float32), history.bias_ids, history.bias_values)
  held = slot_sampling.hold_stops(biased, history.stops, counts < sampling.min_tokens)
  penalized = slot_sampling.penalize(held, history.seen, history.counts,
                                     repetition=sampling.repetition, frequency=sampling.frequency,
                                     presence=sampling.presence)
  tokens = slot_sampling.select(penalized, temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p, seeds=sampling.seed, counts=counts, vocab_limit=vocab_limit,
                                min_p=sampling.min_p)
  return Picked(tokens, *slot_sampling.token_logprobs(logits, tokens, sampling.logprobs, vocab_limit))


def _merge(graphdef, state):
  return nnx.merge(graphdef, state)


def replicated(feats):
  """Image features [F, Q, D] pinned replicated (the zeros of no images and `encode`'s output alike)."""
  return sharding.constrain(feats, (None, None, None))


def encode(graphdef, feature_slots: int, state, images):
  model = _merge(graphdef, state)
  feats = model.encode_images(images[None])[0]  # [n, Q, D]
  return replicated(jnp.pad(feats, ((0, feature_slots - feats.shape[0]), (0, 0), (0, 0))))


def prefill(graphdef, vocab_limit, state, cache: KVCache, history: TokenHistory, ids, lengths, first_image, feats,
            rows, rope_base, sampling: Sampling, bias_ids, bias_values, stop_ids):
  """ids int32[k, P] right-padded (row i's prompt in slots 0 .. lengths[i]-1); lengths int32[k] (>= 1);
  first_image int32[k] (index in `feats` of the row's first image); feats [F, Q, D]; rows int32[k] cache row of each
  prompt (B = padding row, dropped); rope_base float32[k]; bias_ids int32 / bias_values float32 [k,
  MAX_LOGIT_BIAS]: each request's logit bias (`no_bias` for none), and stop_ids int32[k, MAX_STOP_IDS] (V =
  unused) the ids it holds back until its `sampling.min_tokens` (`no_stops` for none), kept in its row's history.
  Returns (`Picked` [k]: the first new tokens, cache, history: the rows' prompts as seen, their answers' counts
  holding the first tokens, their logit biases and stop ids); the `Picked` also scores the prompts of rows with
  `sampling.prompt_logprobs` (`prompt_scores`)."""
  model = _merge(graphdef, state)
  k, p = ids.shape
  q = feats.shape[1]
  slot = jnp.arange(p, dtype=jnp.int32)[None, :]
  valid = slot < lengths[:, None]
  positions = jnp.where(valid, slot, 0)
  segment_ids = valid.astype(jnp.int32)
  x = model.llm.embed(ids)
  is_pad = (ids == model.cfg.image_pad_id) & valid
  flat = feats.reshape(-1, feats.shape[-1])
  index = jnp.clip(first_image[:, None] * q + jnp.cumsum(is_pad, axis=1) - 1, 0, flat.shape[0] - 1)
  x = jnp.where(is_pad[:, :, None], flat[index].astype(x.dtype), x)
  # Right-padded, each prompt is already where it belongs in its slot row (slot = position), so each layer writes
  # its keys and values straight into the slots' cache (`QwenLM.features`' rows): no rolled copy (left-padded rows
  # were rolled into place: one 2048-token request of the 7B model, int8 cache, v5e: temporaries 2.31 -> 2.06 GiB,
  # bytes accessed 11.9 -> 7.7 GB) and no prompt-sized cache of its own that was then copied in (2.1 GiB for 4
  # such requests). The padding's slots hold segment 0 (never a key) until decoding overwrites them.
  h, cache = model.llm.features(x, positions=positions, segment_ids=segment_ids, cache=cache, cache_index=0,
                                rope_base=rope_base[:, None, None], logn=True, rows=rows)
  # Only each row's last prompt position goes through lm_head: k x V, not the k x P x V of the whole prompt.
  last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)  # [k, 1, D]
  logits = model.llm.lm_head(last)[:, 0]
  v, k_rows = logits.shape[-1], jnp.arange(k)[:, None]
  seen = jnp.zeros((k, v), bool).at[k_rows, jnp.where(valid, ids, v)].set(True, mode="drop")
  stops = jnp.zeros((k, v), bool).at[k_rows, stop_ids].set(True, mode="drop")
  joining = TokenHistory(seen, jnp.zeros((k, v), jnp.int32), bias_ids, bias_values, stops)
  picked = _pick(logits, joining, sampling, sampling.count, vocab_limit)
  joining = joining._replace(counts=joining.counts.at[k_rows[:, 0], picked.tokens].set(1))
  history = TokenHistory(*(old.at[rows].set(new, mode="drop") for old, new in zip(history, joining)))
  picked = picked._replace(prompt=prompt_scores(model, h, ids, sampling.prompt_logprobs, vocab_limit))
  return picked, constrain_cache(cache), constrain_history(history)


# The `KVCache` fields laid out [L, B, N, S, ...] (`copy_prompt` copies them a layer at a time).
KV_NAMES = ("k", "v", "k_scale", "v_scale")


def copy_prompt(window: int, cache: KVCache, history: TokenHistory, src, dst):
  """Slot row dst (int32 scalar) takes the prompt prefilled into row src: the keys and values of its first
  `window` cache slots (a length bucket covering the prompt), its segment ids over the whole row (0 past the
  prompt, so dst's previous occupant is never attended) and its history, no answer token counted. The engine
  prefills the prompt of an API request's n choices once this way (`serving.engine`): the copied row then decodes
  from the prompt's last token, whose keys and values it writes again, and picks its first token with its own
  sampling. Returns (cache, history).

  Written per shard (`shard_map` under `sharding.use_rules`): the rows are split over the batch axes, and XLA's
  partitioner turns a slice at a traced row of a split axis into an all-gather of the whole array (the whole cache,
  once per layer). Here the shard holding src slices its row, one `psum` over the row axes hands it to every
  shard (the others add zeros), and the shard holding dst writes it: one row crosses the chips, one layer at a time
  (the cache's in-flight copy is 1/L of a row)."""
  arrays = {"k": (cache.k, KV_AXES), "v": (cache.v, KV_AXES), "k_scale": (cache.k_scale, KV_AXES),
            "v_scale": (cache.v_scale, KV_AXES), "segment_ids": (cache.segment_ids, SEGMENT_AXES)}
  arrays.update({name: (x, HISTORY_AXES) for name, x in history._asdict().items()})
  arrays = {name: value for name, value in arrays.items() if value[0] is not None}
  placed = {name: sharding.active_spec(x.shape, axes) for name, (x, axes) in arrays.items()}
  mesh = None if placed["k"] is None else placed["k"][0]  # None outside `use_rules`
  specs = {name: None if p is None else p[1] for name, p in placed.items()}

  def local(xs, src, dst):
    out = {}
    for name, x in xs.items():
      row_axes = () if mesh is None else sharding.axis_names(specs[name][1 if name in KV_NAMES else 0])
      if name in KV_NAMES:  # [L, B, N, S, ...]: a layer at a time, the first `window` slots
        out[name] = jax.lax.fori_loop(0, x.shape[0], lambda i, x, row_axes=row_axes: _copy_row(
            x, src, dst, 1, row_axes, layer=i, span=window), x)
      else:  # [B, ...]: the whole row; no answer counted in dst's
        out[name] = _copy_row(x, src, dst, 0, row_axes, zero=name == "counts")
    return out

  xs = {name: x for name, (x, _) in arrays.items()}
  if mesh is not None:
    local = jax.shard_map(local, mesh=mesh, in_specs=(specs, jax.sharding.PartitionSpec(),
                                                           jax.sharding.PartitionSpec()), out_specs=specs,
                          check_vma=False)
  out = local(xs, jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32))
  cache = KVCache(out["k"], out["v"], out["segment_ids"], out.get("k_scale"), out.get("v_scale"))
  history = TokenHistory(*(out[name] for name in TokenHistory._fields))
  return constrain_cache(cache), constrain_history(history)


def _copy_row(x, src, dst, axis: int, row_axes: tuple[str, ...], layer=None, span: int | None = None,
              zero: bool = False):
  """This shard's x with global row dst set to global row src (or to zeros), the rows on `axis`, split over the
  mesh axes `row_axes` (none: x is whole); `layer`: only x[layer]; `span`: only the first `span` entries of axis
  + 2 (the cache slots of [L, B, N, S, ...])."""
  n = x.shape[axis]
  start = jax.lax.axis_index(row_axes) * n if row_axes else 0
  zero_index = jnp.zeros((), jnp.int32)

  def at(row):
    index = [zero_index] * x.ndim
    index[axis] = jnp.clip(row - start, 0, n - 1)
    if layer is not None:
      index[0] = layer
    return index

  sizes = list(x.shape)
  sizes[axis] = 1
  if layer is not None:
    sizes[0] = 1
  if span is not None:
    sizes[axis + 2] = min(span, sizes[axis + 2])
  if zero:
    piece = jnp.zeros(sizes, x.dtype)
  else:
    piece = jax.lax.dynamic_slice(x, at(src), sizes)
    if row_axes:  # only src's shard holds it: the others add zeros, so the sum is exact in any dtype
      summed = jnp.int8 if x.dtype == jnp.bool_ else x.dtype
      mine = (src >= start) & (src < start + n)
      piece = jax.lax.psum(jnp.where(mine, piece, 0).astype(summed), row_axes).astype(x.dtype)
  if row_axes:  # a shard without dst writes its own values back where its clipped index points
    piece = jnp.where((dst >= start) & (dst < start + n), piece, jax.lax.dynamic_slice(x, at(dst), sizes))
  return jax.lax.dynamic_update_slice(x, piece, at(dst))


def decode(graphdef, vocab_limit, steps: int, window: int, state, cache: KVCache, history: TokenHistory, tokens,
           positions, active, rope_base, sampling: Sampling):
  """`steps` decode steps of the first R rows of the cache (R <= B, a decode-size bucket covering every active
  slot): tokens int32[R] are fed at int32[R] positions (= cache slots), each step's tokens are fed at the next
  positions, and attention reads the first `window` slots (every position fed must be below it). Inactive rows
  write segment 0 (never a key) and their outputs are ignored; sampling of step j uses count + j, as a one-step
  call would; each new token is counted in its row's history. Returns (`Picked` [steps, R]: the new tokens, cache,
  history)."""
  seg = active.astype(jnp.int32)[:, None]

  def step(carry, _):
    # The weights ride in the carry: NNX modules are rebuilt from values of the loop's own trace (as decode.py).
    state, cache, history, tokens, positions, count = carry
    model = _merge(graphdef, state)
    # The whole cache goes in: the model writes and reads only its first R rows (`QwenLM.features`), in place.
    logits, cache = model.llm(model.llm.embed(tokens[:, None]), positions=positions[:, None], segment_ids=seg,
                              cache=cache, cache_index=positions, rope_base=rope_base[:, None, None], logn=True,
                              window=window)
    picked = _pick(logits[:, 0], history, sampling, count, vocab_limit)
    counts = history.counts.at[jnp.arange(tokens.shape[0]), picked.tokens].add(active.astype(jnp.int32))
    return (state, cache, history._replace(counts=counts), picked.tokens, positions + 1, count + 1), picked

  (_, cache, history, *_), out = jax.lax.scan(step, (state, cache, history, tokens, positions, sampling.count), None,
                                              length=steps)
  return out, constrain_cache(cache), constrain_history(history)


