"""`SlotModel`: a model's jitted encode / prefill / decode (`inference.slot_programs`) over one KV cache of B decode
slots, the device side of the continuously batched engine (`serving.engine`); see `slot_programs` for the letters,
the shapes and why the cache slot equals the RoPE position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.inference import slot_programs
from qwenvl_jax.inference.slot_programs import Sampling  # noqa: F401  (re-exported: the engine's sampling rows)
from qwenvl_jax.model.qwen import constrain_cache


class SlotModel:
  """A model's jitted encode / prefill / decode over `num_slots` rows of `context` cache slots (build it inside the
  `sharding.use_rules` its calls run in, as `Engine` does).

  The cache and the token history (`slot_programs.TokenHistory`) live here and are donated to every call that
  updates them (updated in place, never copied).
  vocab_limit: ids >= this are never produced (the tokenizer's vocabulary size).
  feature_slots: F, the most images one prefill call takes (requests per prefill x images per request).
  """

  def __init__(self, model: nnx.Module, *, num_slots: int, context: int, feature_slots: int,
               vocab_limit: int | None = None, cache_dtype=None):
    self.cfg = model.cfg
    self.num_slots, self.context, self.feature_slots = num_slots, context, feature_slots
    self.graphdef, self.state = nnx.split(model)
    # Made by jitted programs, so that under `sharding.use_rules` they have the sharding of the programs' outputs.
    self.cache = jax.jit(lambda: constrain_cache(model.llm.init_cache(num_slots, context, dtype=cache_dtype)))()
    self.history = jax.jit(lambda: slot_programs.init_history(num_slots, self.cfg.llm.vocab_size))()
    self.vocab_limit = vocab_limit
    # graphdef and vocab_limit are bound, not static arguments: jit would hash the graphdef on every call
    # (~0.3 ms, as much as a one-row decode step of the tiny model).
    self._encode = jax.jit(functools.partial(slot_programs.encode, self.graphdef, feature_slots))
    self._prefill = jax.jit(functools.partial(slot_programs.prefill, self.graphdef, vocab_limit),
                            donate_argnums=(1, 2))
    self._decode_fns = {}  # (steps, window) -> jitted `slot_programs.decode`
    self._copy_fns = {}  # window -> jitted `slot_programs.copy_prompt`
    q, d = self.cfg.image_tokens, self.cfg.llm.width
    self.no_features = jax.jit(lambda: slot_programs.replicated(jnp.zeros((feature_slots, q, d), self.cfg.dtype)))()

  def encode(self, images: np.ndarray, *, compile_only: bool = False) -> jax.Array | None:
    """uint8[n, S, S, 3] (n <= F, a bucket) -> features [F, Q, D], rows past n zero. compile_only (every method's):
    compile the program these arguments call, run nothing, return None (`Engine`'s warm-up compiles several at
    once so; the call that follows finds it compiled)."""
    if len(images) > self.feature_slots:
      raise ValueError(f"{len(images)} images exceed the {self.feature_slots} feature slots of one prefill")
    if compile_only:
      return _compile(self._encode, self.state, images)
    return self._encode(self.state, images)

  def prefill(self, ids: np.ndarray, lengths: np.ndarray, first_image: np.ndarray, feats: jax.Array,
              rows: np.ndarray, rope_base: np.ndarray, sampling: Sampling,
              bias: tuple[np.ndarray, np.ndarray] | None = None,
              stop_ids: np.ndarray | None = None, *, compile_only: bool = False) -> slot_programs.Picked | None:
    """Writes k prompts into cache rows `rows` and returns their first new tokens (`Picked` [k], on device). bias:
    the requests' logit bias (`slot_programs.prefill`'s bias_ids, bias_values; None = none); stop_ids: the ids each
    holds back until its `sampling.min_tokens` (`prefill`'s; None = none)."""
    bias = bias or slot_programs.no_bias(len(ids), self.cfg.llm.vocab_size)
    stop_ids = slot_programs.no_stops(len(ids), self.cfg.llm.vocab_size) if stop_ids is None else stop_ids
    args = (self.state, self.cache, self.history, ids, lengths, first_image, feats, rows, rope_base, sampling, *bias,
            stop_ids)
    if compile_only:
      return _compile(self._prefill, *args)
    first, self.cache, self.history = self._prefill(*args)
    return first

  def decode(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, rope_base: np.ndarray,
             sampling: Sampling, steps: int = 1, window: int | None = None, *,
             compile_only: bool = False) -> slot_programs.Picked | None:
    """`steps` steps of the first R slots (R = len(tokens)) attending to the first `window` cache slots (default
    all; every position fed, positions + steps - 1 included, must be below it): the new tokens (`Picked`
    [steps, R], on device)."""
    args = (self.state, self.cache, self.history, tokens, positions, active, rope_base, sampling)
    if compile_only:
      return _compile(self.decode_program(steps, window), *args)
    nxt, self.cache, self.history = self.decode_program(steps, window)(*args)
    return nxt

  def decode_program(self, steps: int = 1, window: int | None = None):
    """The jitted decode call of `decode(..., steps, window)`, taking (state, cache, history, tokens, positions,
    active, rope_base, sampling) (e.g. to `.lower(...)` it for a memory analysis)."""
    key = (steps, window or self.context)
    if key not in self._decode_fns:  # setdefault: warm-up threads asking for one key at once all get the same jit
      program = functools.partial(slot_programs.decode, self.graphdef, self.vocab_limit, *key)
      self._decode_fns.setdefault(key, jax.jit(program, donate_argnums=(1, 2)))
    return self._decode_fns[key]

  def copy_prompt(self, src: int, dst: int, window: int | None = None, *, compile_only: bool = False) -> None:
    """Cache row dst takes row src's prompt (its first `window` slots, default all) and history, no answer token
    counted (`slot_programs.copy_prompt`)."""
    window = window or self.context
    if window not in self._copy_fns:  # setdefault: as in `decode_program`
      self._copy_fns.setdefault(window, jax.jit(functools.partial(slot_programs.copy_prompt, window),
                                                donate_argnums=(0, 1)))
    args = (self.cache, self.history, np.int32(src), np.int32(dst))
    if compile_only:
      return _compile(self._copy_fns[window], *args)
    self.cache, self.history = self._copy_fns[window](*args)
    return None


def _compile(jitted, *args) -> None:
  """Compiles what `jitted(*args)` runs (nothing runs, no buffer is donated): jit keeps the executable for the call
  with arguments of the same shapes, shardings and types."""
  jitted.lower(*args).compile()
