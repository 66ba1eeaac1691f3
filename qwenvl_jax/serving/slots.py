"""The device side of continuous batching: B decode slots over one KV cache, and three jitted programs on it.

Letters: B decode slots, C cache slots per row (the context limit), k requests joining in one prefill (padded to
a prefill-batch bucket), P padded prompt length (a length bucket), F image-feature buffer (images per prefill
group, padded), n images encoded in one call (an image-batch bucket), Q image tokens, D LLM width, V vocabulary,
L layers, S image side.

  encode(images uint8[n, S, S, 3])                     -> feats [F, Q, D] (ViT + adapter, zero-padded to F)
  prefill(cache, ids[k, P], lengths, first_image, feats, rows, ...) -> first tokens int32[k], cache
  decode(cache, tokens[R], positions[R], active[R], ...) -> next tokens int32[R], cache   (the first R rows)

Every slot row of the cache belongs to one request at a time. A request's prompt occupies its row's slots
0 .. len-1 and its n-th new token slot len + n, so the cache slot equals the RoPE position and rows advance
independently (the model writes each row at its own `cache_index`, `qwen.write_slots`). Prefill runs the joining
prompts left-padded, as `decode.prefill` (the last position is the next-token logit, and only it goes through
`lm_head`), then rolls each row left by its padding and writes it into its slot row, clearing the rest of the row
(the previous occupant's keys are never attended again: their segment ids are 0).

Shapes are fixed per (k, P) for prefill, per n for encode and per R for decode (R: a power of two covering the
highest busy slot, so one client costs a one-row step, not a B-row one), so a server warms them all up front and
never compiles again (`engine.Engine.warm_up`). Images are encoded in one call for every joining
request (any number per request, anywhere in its history); the k-th `<imgpad>` of a prompt takes feature
k % Q of the prompt's image k // Q, as `QwenVL.embed`. Dynamic NTK (per-row RoPE base, decided at prefill and
kept) and logn scaling are on, as in `decode.Generator`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.model.qwen import KVCache, constrain_cache
from qwenvl_jax.serving import slot_sampling


class Sampling(NamedTuple):
  """Per-row sampling settings (see `slot_sampling.select`): float32 temperature (0 = greedy), int32 top_k,
  float32 top_p, uint32 seed, int32 count (tokens generated so far)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  count: jax.Array


def _merge(graphdef, state):
  return nnx.merge(graphdef, state)


def _encode(graphdef, feature_slots: int, state, images):
  model = _merge(graphdef, state)
  feats = model.encode_images(images[None])[0]  # [n, Q, D]
  return jnp.pad(feats, ((0, feature_slots - feats.shape[0]), (0, 0), (0, 0)))


def _prefill(graphdef, vocab_limit, state, cache: KVCache, ids, lengths, first_image, feats, rows, rope_base,
             sampling: Sampling):
  """ids int32[k, P] left-padded; lengths int32[k]; first_image int32[k] (index in `feats` of the row's first
  image); feats [F, Q, D]; rows int32[k] cache row of each prompt (B = padding row, dropped); rope_base
  float32[k]. Returns (int32[k] first new tokens, cache)."""
  model = _merge(graphdef, state)
  k, p = ids.shape
  q = feats.shape[1]
  pad = p - lengths  # int32[k] left padding
  slot = jnp.arange(p, dtype=jnp.int32)[None, :]
  valid = slot >= pad[:, None]
  positions = jnp.where(valid, slot - pad[:, None], 0)
  segment_ids = valid.astype(jnp.int32)
  x = model.llm.embed(ids)
  is_pad = ids == model.cfg.image_pad_id
  flat = feats.reshape(-1, feats.shape[-1])
  index = jnp.clip(first_image[:, None] * q + jnp.cumsum(is_pad, axis=1) - 1, 0, flat.shape[0] - 1)
  x = jnp.where(is_pad[:, :, None], flat[index].astype(x.dtype), x)
  small = model.llm.init_cache(k, p, dtype=cache.k.dtype)
  h, small = model.llm.features(x, positions=positions, segment_ids=segment_ids, cache=small, cache_index=0,
                                rope_base=rope_base[:, None, None], logn=True)
  # Only the last position's logits are needed: k x V, not the k x P x V of the whole prompt.
  logits = model.llm.lm_head(h[:, -1:])[:, 0]
  first = slot_sampling.select(logits, temperature=sampling.temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p, seeds=sampling.seed, counts=sampling.count,
                               vocab_limit=vocab_limit)
  # Left-aligned: row i's prompt moves from slots pad_i .. P-1 to 0 .. len_i-1 (slot = position from now on).
  order = (slot + pad[:, None]) % p  # [k, P]
  roll_kv = jax.vmap(lambda x, o: jnp.take(x, o, axis=1), in_axes=(1, 0), out_axes=1)  # over [L, k, P, N, H]
  new_k, new_v = roll_kv(small.k, order), roll_kv(small.v, order)
  new_seg = jnp.take_along_axis(small.segment_ids, order, axis=1)
  c = cache.segment_ids.shape[1]
  seg_rows = jnp.pad(new_seg, ((0, 0), (0, c - p)))
  cache = KVCache(cache.k.at[:, rows, :p].set(new_k, mode="drop"),
                  cache.v.at[:, rows, :p].set(new_v, mode="drop"),
                  cache.segment_ids.at[rows].set(seg_rows, mode="drop"))
  return first, constrain_cache(cache)


def _decode(graphdef, vocab_limit, state, cache: KVCache, tokens, positions, active, rope_base,
            sampling: Sampling):
  """tokens int32[R] at int32[R] positions (= cache slots) for the first R rows of the cache (R <= B, a
  decode-size bucket covering every active slot); inactive rows write segment 0 (never a key) and their outputs
  are ignored. Returns (int32[R] next tokens, cache)."""
  model = _merge(graphdef, state)
  r = tokens.shape[0]
  rows = KVCache(cache.k[:, :r], cache.v[:, :r], cache.segment_ids[:r])
  seg = active.astype(jnp.int32)[:, None]
  logits, rows = model.llm(model.llm.embed(tokens[:, None]), positions=positions[:, None], segment_ids=seg,
                           cache=rows, cache_index=positions, rope_base=rope_base[:, None, None], logn=True)
  nxt = slot_sampling.select(logits[:, 0], temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, seeds=sampling.seed, counts=sampling.count,
                             vocab_limit=vocab_limit)
  if r == cache.segment_ids.shape[0]:
    return nxt, constrain_cache(rows)
  # The other rows are untouched; the donated cache is updated in place.
  return nxt, constrain_cache(KVCache(cache.k.at[:, :r].set(rows.k), cache.v.at[:, :r].set(rows.v),
                                      cache.segment_ids.at[:r].set(rows.segment_ids)))


class SlotModel:
  """A model's jitted encode / prefill / decode over `num_slots` rows of `context` cache slots.

  The cache lives here and is donated to every call that updates it (updated in place, never copied).
  vocab_limit: ids >= this are never produced (the tokenizer's vocabulary size).
  feature_slots: F, the most images one prefill call takes (requests per prefill x images per request).
  """

  def __init__(self, model: nnx.Module, *, num_slots: int, context: int, feature_slots: int,
               vocab_limit: int | None = None, cache_dtype=None):
    self.cfg = model.cfg
    self.num_slots, self.context, self.feature_slots = num_slots, context, feature_slots
    self.graphdef, self.state = nnx.split(model)
    # Created by a jitted call: under `sharding.use_rules` each chip allocates only its part of the cache.
    self.cache = jax.jit(lambda: model.llm.init_cache(num_slots, context, dtype=cache_dtype))()
    self._encode = jax.jit(_encode, static_argnums=(0, 1))
    self._prefill = jax.jit(_prefill, static_argnums=(0, 1), donate_argnums=(3,))
    self._decode = jax.jit(_decode, static_argnums=(0, 1), donate_argnums=(3,))
    self.vocab_limit = vocab_limit
    q, d = self.cfg.image_tokens, self.cfg.llm.width
    self.no_features = jnp.zeros((feature_slots, q, d), self.cfg.dtype)

  def encode(self, images: np.ndarray) -> jax.Array:
    """uint8[n, S, S, 3] (n <= F, a bucket) -> features [F, Q, D], rows past n zero."""
    if len(images) > self.feature_slots:
      raise ValueError(f"{len(images)} images exceed the {self.feature_slots} feature slots of one prefill")
    return self._encode(self.graphdef, self.feature_slots, self.state, images)

  def prefill(self, ids: np.ndarray, lengths: np.ndarray, first_image: np.ndarray, feats: jax.Array,
              rows: np.ndarray, rope_base: np.ndarray, sampling: Sampling) -> jax.Array:
    """Writes k prompts into cache rows `rows` and returns their first new tokens int32[k] (on device)."""
    first, self.cache = self._prefill(self.graphdef, self.vocab_limit, self.state, self.cache, ids, lengths,
                                      first_image, feats, rows, rope_base, sampling)
    return first

  def decode(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, rope_base: np.ndarray,
             sampling: Sampling) -> jax.Array:
    """One step of the first R slots (R = len(tokens)): int32[R] next tokens (on device)."""
    nxt, self.cache = self._decode(self.graphdef, self.vocab_limit, self.state, self.cache, tokens, positions,
                                   active, rope_base, sampling)
    return nxt
