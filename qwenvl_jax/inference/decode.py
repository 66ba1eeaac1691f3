"""KV-cache generation with fixed shapes: left-padded prompt batches, a jitted prefill and decode step, and two
loops over them (one `jax.lax.while_loop` inside jit for batch jobs, one Python loop for streaming).

Letters: B rows, P padded prompt length (a bucket), N max new tokens, M image slots per row, S image side,
V vocabulary, L layers.

Positions and padding (a deliberate difference from the reference, Gotcha 12): prompts are LEFT-padded so every
row's next token lands in the same cache slot, and each row's RoPE positions are `cumsum(valid) - 1`, so a
left-padded row computes exactly what the same prompt computes alone. The reference instead gives the pads
positions too (it ignores `position_ids`), so its left-padded rows see shifted positions; ours equal its
unpadded single-prompt results. Pads get segment id 0, so they are never keys.

Dynamic NTK and logn (Gotcha 13): the NTK RoPE base is decided at prefill from each row's real prompt length
(`positional.ntk_rope_base`) and kept for all its decode steps (the reference's "sticky" alpha); logn query
scaling is on. Both are no-ops up to `seq_length` (2048) tokens.

Shapes are fixed per (bucket P, N, B, M): prompt lengths are rounded up to a few bucket sizes to bound
recompiles. The cache holds P + N slots.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import errors, sharding
from qwenvl_jax.inference import sampling
from qwenvl_jax.model import positional
from qwenvl_jax.model.config import QwenVLConfig
from qwenvl_jax.model.qwen import KVCache

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
EOD_ID = 151643  # Qwen's <|endoftext|>: the reference's eos and pad id


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
  """Decoding settings (hashable: a jit static argument; a new value compiles a new loop).

  max_new_tokens: N, the most tokens generated per row (the eos counts).
  min_new_tokens: eos is forbidden before this many new tokens (the official evals use 1, 8 or 10).
  do_sample: False = greedy (argmax); True = sampling with temperature / top_k (0 = off) / top_p (1 = off).
  eos_id: the token that ends a row (151643 for Qwen); pad_id: what finished rows emit (151643 too).
  stop_words: token sequences that force eos next (`text.get_stop_words_ids`); `[eos]` itself is ignored.
  vocab_limit: ids >= this are never produced (the tokenizer's size when the model has padding rows).
  logn, dynamic_ntk: the reference's inference-only long-context scalings (on by default).
  """
  max_new_tokens: int = 512
  min_new_tokens: int = 0
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int = EOD_ID
  pad_id: int = EOD_ID
  stop_words: tuple[tuple[int, ...], ...] = ()
  vocab_limit: int | None = None
  logn: bool = True
  dynamic_ntk: bool = True

  def __post_init__(self):
    for name in ("max_new_tokens", "min_new_tokens", "top_k", "eos_id", "pad_id"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise errors.ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if self.vocab_limit is not None and not isinstance(self.vocab_limit, (int, np.integer)):
      raise errors.ConfigError(f"vocab_limit must be an int or None, got {type(self.vocab_limit).__name__}")
    for name in ("temperature", "top_p"):
      if not isinstance(getattr(self, name), (int, float, np.integer, np.floating)):
        raise errors.ConfigError(f"{name} must be a number, got {type(getattr(self, name)).__name__} "
                                 f"{getattr(self, name)!r}")
    if self.max_new_tokens < 1:
      raise errors.ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise errors.ConfigError(f"need 0 <= min_new_tokens <= max_new_tokens, got {self.min_new_tokens}, "
                       f"{self.max_new_tokens}")
    if not self.do_sample and (self.temperature != 1.0 or self.top_k != 0 or self.top_p != 1.0):
      # Greedy decoding ignores them: a user asking for top_p=0.3 got argmax answers without a word (transformers
      # warns here; `generate` refuses the same flags without --do_sample).
      raise errors.ConfigError(
          f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p} act only when sampling, and "
          "do_sample=False decodes greedily", hint="add do_sample=True (Qwen-VL-Chat's own setting: do_sample=True, "
          "top_p=0.3), or leave them at 1.0 / 0 / 1.0")
    if self.do_sample and not self.temperature > 0:
      raise errors.ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
    if self.top_k < 0:
      raise errors.ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise errors.ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
    stop_words = tuple(tuple(int(t) for t in seq) for seq in self.stop_words)
    if any(not seq for seq in stop_words):
      raise errors.ConfigError(f"stop words must be non-empty token sequences, got {self.stop_words!r}")
    # `[eos]` as a stop word is a no-op (generation ends on eos anyway); the reference filters it out too.
    object.__setattr__(self, "stop_words", tuple(seq for seq in stop_words if seq != (self.eos_id,)))

  def split(self) -> tuple["GenerationConfig", dict]:
    """(the part that shapes the compiled loop, the values passed to it as int32 scalars).

    The ids, `min_new_tokens` and `vocab_limit` are traced, so changing them does not recompile.
    """
    dynamic = {"eos_id": self.eos_id, "pad_id": self.pad_id, "min_new_tokens": self.min_new_tokens,
               "vocab_limit": np.iinfo(np.int32).max if self.vocab_limit is None else self.vocab_limit}
    static = copy.copy(self)  # not dataclasses.replace: __post_init__ must not filter the stop words again
    for name in dynamic:
      object.__setattr__(static, name, None if name == "vocab_limit" else 0)
    return static, {k: np.int32(v) for k, v in dynamic.items()}


class PromptBatch(NamedTuple):
  """A left-padded batch of prompts (host numpy arrays), ready for `Generator`.

  input_ids: int32[B, P], pads on the left.
  segment_ids: int32[B, P], 1 on prompt tokens, 0 on pads.
  positions: int32[B, P], 0 .. len-1 on each row's prompt tokens (pads 0).
  lengths: int32[B], real prompt lengths.
  images: uint8[B, M, S, S, 3] or None; image_mask: bool[B, M] or None.
  """
  input_ids: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  lengths: np.ndarray
  images: np.ndarray | None = None
  image_mask: np.ndarray | None = None


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket >= n; past the largest, n rounded up to a multiple of the largest."""
  if n < 1:
    raise ValueError(f"a prompt needs at least one token, got length {n}")
  for b in sorted(buckets):
    if b >= n:
      return b
  top = max(buckets)
  return -(-n // top) * top


def make_prompt_batch(prompts: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]] | None = None, *,
                      pad_id: int, image_pad_id: int, image_tokens: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
                      num_rows: int | None = None, max_images: int | None = None,
                      image_size: int | None = None) -> PromptBatch:
  """Left-pads token prompts into a `PromptBatch`.

  Args:
    prompts: per row the prompt ids (image spans expanded to `<img>` + Q x `<imgpad>` + `</img>`).
    images: per row its images uint8[S, S, 3] in order of appearance (already preprocessed), or None when no row
      has images.
    pad_id: the id put in pad slots (never attended; the reference uses `<|endoftext|>`).
    image_pad_id, image_tokens: `<imgpad>` id and Q, to check that each row holds Q `<imgpad>` per image.
    buckets: allowed padded lengths P.
    num_rows: pad the batch to this many rows with empty rows (their outputs are meaningless; for fixed B).
    max_images: M, image slots per row (default: the most any row has). With `image_size` as well, the image
      arrays exist (all slots empty) even when no row has an image, so one compiled shape serves both.
  Raises:
    ValueError naming the row on an empty prompt or a mismatch between `<imgpad>` ids and images.
  """
  b = len(prompts)
  if b == 0:
    raise ValueError("make_prompt_batch needs at least one prompt")
  rows = num_rows if num_rows is not None else b
  if rows < b:
    raise ValueError(f"num_rows={rows} is smaller than the {b} prompts")
  if images is not None and len(images) != b:
    raise ValueError(f"{len(images)} image lists for {b} prompts")
  if images is not None and any(isinstance(x, (str, bytes, os.PathLike)) for row in images for x in row):
    raise errors.ConfigError("make_prompt_batch takes images as preprocessed uint8[S, S, 3] arrays, not paths",
                             hint="chat.load_images(paths, image_size) preprocesses them")
  lengths = np.zeros(rows, np.int32)
  for i, p in enumerate(prompts):
    if isinstance(p, (str, bytes)):  # it failed as int('hello') while filling the ids
      raise errors.ConfigError(f"prompt {i} is text ({p[:40]!r}); make_prompt_batch takes token ids",
                               hint="tok.encode(text), or chat(gen, tok, text) for the whole turn")
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty")
    lengths[i] = len(p)
    n_pad = int(np.sum(np.asarray(p) == image_pad_id))
    n_img = 0 if images is None else len(images[i])
    if n_pad != n_img * image_tokens:
      raise ValueError(f"prompt {i} holds {n_pad} <imgpad> ids but {n_img} images x {image_tokens} image tokens "
                       f"= {n_img * image_tokens} are needed")
  width = bucket_length(int(lengths.max()), buckets)
  input_ids = np.full((rows, width), pad_id, np.int32)
  segment_ids = np.zeros((rows, width), np.int32)
  positions = np.zeros((rows, width), np.int32)
  for i, p in enumerate(prompts):
    n = len(p)
    input_ids[i, width - n:] = p
    segment_ids[i, width - n:] = 1
    positions[i, width - n:] = np.arange(n)
  image_arr = mask = None
  counts = [len(x) for x in images] if images is not None else [0]
  if max(counts) == 0 and max_images and image_size:
    image_arr = np.zeros((rows, max_images, image_size, image_size, 3), np.uint8)
    mask = np.zeros((rows, max_images), bool)
  elif max(counts) > 0:
    m = max_images if max_images is not None else max(counts)
    if m < max(counts):
      raise ValueError(f"max_images={m} but a row has {max(counts)} images")
    shapes = {np.asarray(x).shape for row in images for x in row}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
      raise ValueError(f"all images must be uint8[S, S, 3] of one size, got shapes {sorted(shapes)}")
    dtypes = {np.asarray(x).dtype for row in images for x in row}
    if dtypes != {np.dtype(np.uint8)}:
      # Assigning into the uint8 batch would cast silently: floats in [0, 1] became an all-black picture.
      raise errors.ConfigError(f"images must be uint8 RGB arrays (0..255, not normalized), got dtype "
                               f"{', '.join(sorted(map(str, dtypes)))}",
                               hint="load_images(paths, image_size) or data.images.preprocess_image(x, size)")
    shape = next(iter(shapes))
    image_arr = np.zeros((rows, m) + shape, np.uint8)
    mask = np.zeros((rows, m), bool)
    for i, row in enumerate(images):
      for j, x in enumerate(row):
        image_arr[i, j] = x
        mask[i, j] = True
  return PromptBatch(input_ids, segment_ids, positions, lengths, image_arr, mask)


def rope_bases(lengths: np.ndarray, cfg: QwenVLConfig, dynamic_ntk: bool) -> np.ndarray:
  """float32[B]: each row's RoPE base, the dynamic-NTK base of its prompt length (or the plain base)."""
  llm = cfg.llm
  if not dynamic_ntk:
    return np.full(len(lengths), llm.rope_base, np.float32)
  return np.asarray([positional.ntk_rope_base(llm.rope_base, llm.head_dim, max(int(n), 1), llm.seq_length)
                     for n in lengths], np.float32)


class DecodeState(NamedTuple):
  """The loop carry. tokens: int32[B, P + N] prompt then new tokens; step: new tokens so far (int32 scalar);
  done: bool[B] rows that produced eos; lengths: int32[B] prompt lengths; rope_base: float32[B] (sticky)."""
  cache: KVCache
  tokens: jax.Array
  step: jax.Array
  done: jax.Array
  lengths: jax.Array
  rope_base: jax.Array
  key: jax.Array


def _select(gen: GenerationConfig, dyn: dict, logits, key, tokens, end, step, done):
  return sampling.select_tokens(
      logits, key, tokens=tokens, end=end, num_generated=step, done=done, greedy=not gen.do_sample,
      temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, eos_id=dyn["eos_id"], pad_id=dyn["pad_id"],
      min_new_tokens=dyn["min_new_tokens"], stop_words=gen.stop_words, vocab_limit=dyn["vocab_limit"])


def prefill(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, cache: KVCache, *, rope_base: jax.Array,
            logn: bool = True) -> tuple[jax.Array, KVCache]:
  """Runs the prompts, writing cache slots 0 .. P-1. Pure.

  Args:
    graphdef, state: `nnx.split(model)` of a `QwenVL`.
    batch: `PromptBatch` fields as arrays (`input_ids`, `segment_ids`, `positions`, optional `images`,
      `image_mask`).
    cache: an empty `KVCache` of B rows and >= P slots.
    rope_base: float32[B] per-row RoPE base.
  Returns:
    (float32[B, V] logits of the last prompt position, the filled cache).
  """
  model = nnx.merge(graphdef, state)
  # The prompts fill slots 0 .. P-1 and every later slot is empty (never a key), so they attend to those P slots
  # only: exact, and the scores are [B, N, P, P], not [B, N, P, S] over the whole cache. A square mask is also
  # what a kernel takes (`attention._splash`; with S slots it falls back to xla).
  h, cache = model.features(batch["input_ids"], images=batch.get("images"), image_mask=batch.get("image_mask"),
                            positions=batch["positions"], segment_ids=batch["segment_ids"], cache=cache,
                            cache_index=0, rope_base=rope_base[:, None, None], logn=logn,
                            window=batch["input_ids"].shape[1])
  # Only the last position's logits, [B, V]: XLA computes a dot whose output is sliced whole, so the model's
  # `logits[:, -1]` projected every position first (on CPU a [B x P, V] buffer; on a v5e, 1.27 TFLOP of a 1024-token
  # row's ~20 for the 7B model's 151,936-token vocabulary).
  logits = sharding.constrain(model.llm.lm_head(h[:, -1:]), ("act_batch", "act_len", "act_vocab"))
  return logits[:, 0].astype(jnp.float32), cache


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
                cache: KVCache, cache_index: jax.Array, *, rope_base: jax.Array,
                logn: bool = True) -> tuple[jax.Array, KVCache]:
  """One token per row: int32[B] at int32[B] positions, written at cache slot `cache_index`. Pure.

  Returns (float32[B, V] logits, updated cache).
  """
  model = nnx.merge(graphdef, state)
  ones = jnp.ones_like(tokens)[:, None]
  # The slot is given per row (every row the same) so the cache takes the per-row scatter write, as the serving
  # engine's decode does: with one scalar slot (a dynamic-update-slice) the TPU compiler gave the cache another
  # layout inside the layer loop and converted it in and out, holding a copy of half the cache in temporaries
  # (9.6B, v5e-8, 48 rows x 2048: 3.0 GiB per chip, 0.0004 GiB this way; AOT, planning/inference_plan.py).
  index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), tokens.shape)
  out = model(tokens[:, None], positions=positions[:, None], segment_ids=ones, cache=cache,
              cache_index=index, rope_base=rope_base[:, None, None], logn=logn)
  return out.logits[:, 0].astype(jnp.float32), out.cache


def _start(graphdef, gen: GenerationConfig, state, batch: dict, key, dyn: dict, kv_cache_dtype=None
           ) -> DecodeState:
  """Prefill + the first new token (slot P of the buffer). kv_cache_dtype: None (compute dtype) or "int8"."""
  b, p = batch["input_ids"].shape
  model = nnx.merge(graphdef, state)
  cache = model.llm.init_cache(b, p + gen.max_new_tokens, dtype=kv_cache_dtype)
  lengths = batch["segment_ids"].sum(axis=1).astype(jnp.int32)
  logits, cache = prefill(graphdef, state, batch, cache, rope_base=batch["rope_base"], logn=gen.logn)
  tokens = jnp.concatenate([batch["input_ids"], jnp.full((b, gen.max_new_tokens), dyn["pad_id"], jnp.int32)], 1)
  key, sub = jax.random.split(key)
  done = jnp.zeros((b,), bool)
  first = _select(gen, dyn, logits, sub, tokens, p - 1, jnp.int32(0), done)
  tokens = tokens.at[:, p].set(first)
  return DecodeState(cache, tokens, jnp.int32(1), first == dyn["eos_id"], lengths, batch["rope_base"], key)


def _advance(graphdef, gen: GenerationConfig, p: int, state, s: DecodeState, dyn: dict) -> DecodeState:
  """Feeds the last new token through the model and appends the next one."""
  last_slot = p + s.step - 1
  last = jax.lax.dynamic_index_in_dim(s.tokens, last_slot, axis=1, keepdims=False)
  logits, cache = decode_step(graphdef, state, last, s.lengths + s.step - 1, s.cache, last_slot,
                              rope_base=s.rope_base, logn=gen.logn)
  key, sub = jax.random.split(s.key)
  nxt = _select(gen, dyn, logits, sub, s.tokens, last_slot, s.step, s.done)
  tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, nxt, last_slot + 1, axis=1)
  return s._replace(cache=cache, tokens=tokens, step=s.step + 1, done=s.done | (nxt == dyn["eos_id"]), key=key)


def _generate_all(graphdef, gen: GenerationConfig, state, batch: dict, key, dyn: dict, kv_cache_dtype=None):
  p = batch["input_ids"].shape[1]
  s = _start(graphdef, gen, state, batch, key, dyn, kv_cache_dtype)

  def cond(carry):
    s = carry[1]
    return (s.step < gen.max_new_tokens) & ~jnp.all(s.done)

  def body(carry):
    # The weights ride in the carry: NNX modules must be rebuilt from values of the loop's own trace level.
    state, s = carry
    return state, _advance(graphdef, gen, p, state, s, dyn)

  _, s = jax.lax.while_loop(cond, body, (state, s))
  return s.tokens[:, p:], s.step


class Generator:
  """Jitted generation for one model.

  Usage:
    gen = Generator(model)                       # a QwenVL (any dtype, float or quantized weights)
    gen = Generator(model, kv_cache_dtype="int8")   # int8 KV cache (half the bytes of bf16; `qwen.KVCache`)
    batch = make_prompt_batch(prompts, images, pad_id=..., image_pad_id=..., image_tokens=...)
    new_tokens = gen.generate(batch, GenerationConfig(max_new_tokens=30))     # int32[B, N], pad after eos
    for step_tokens in gen.stream(batch, config): ...                         # int32[B] per step
  """

  def __init__(self, model: nnx.Module, *, state: nnx.State | None = None, kv_cache_dtype: str | None = None):
    if not isinstance(model, nnx.Module) or not isinstance(getattr(model, "cfg", None), QwenVLConfig):
      raise errors.ConfigError(f"Generator takes the model (a QwenVL), got {type(model).__name__}",
                               hint="loaded = qwenvl_jax.load(CHECKPOINT); qwenvl_jax.Generator(loaded.model)")
    if kv_cache_dtype not in (None, "int8"):
      raise errors.ConfigError(f"kv_cache_dtype must be None (the compute dtype) or 'int8', got {kv_cache_dtype!r}")
    self.cfg: QwenVLConfig = model.cfg
    self.kv_cache_dtype = kv_cache_dtype
    self.graphdef, model_state = nnx.split(model)
    self.state = model_state if state is None else state
    self._generate = jax.jit(functools.partial(_generate_all, kv_cache_dtype=kv_cache_dtype),
                             static_argnums=(0, 1))
    self._start = jax.jit(functools.partial(_start, kv_cache_dtype=kv_cache_dtype), static_argnums=(0, 1))
    self._advance = jax.jit(_advance, static_argnums=(0, 1, 2), donate_argnums=(4,))

  def device_batch(self, batch: PromptBatch, gen: GenerationConfig) -> dict:
    """The batch as the dict of arrays the jitted functions take (adds the per-row RoPE bases).

    Raises errors.ConfigError for a batch that is not a `PromptBatch`, a `gen` that is not a `GenerationConfig`,
    or a token id outside the model's vocabulary (the embedding lookup would clamp it silently).
    """
    _check_arguments(batch, gen, dict_ok=False)
    ids = batch.input_ids[batch.segment_ids > 0]
    vocab = self.cfg.llm.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
      raise errors.ConfigError(f"the prompt holds token id {bad}, outside the model's vocabulary 0..{vocab - 1}",
                               hint="encode the prompt with the model's own tokenizer (loaded.tokenizer)")
    out = {"input_ids": batch.input_ids, "segment_ids": batch.segment_ids, "positions": batch.positions,
           "rope_base": rope_bases(batch.lengths, self.cfg, gen.dynamic_ntk)}
    if batch.images is not None:
      out["images"], out["image_mask"] = batch.images, batch.image_mask
    return out

  def generate(self, batch: PromptBatch | dict, gen: GenerationConfig, key: jax.Array | None = None
               ) -> np.ndarray:
    """int32[B, N] new tokens of every row (eos included; `pad_id` after it and past the early stop)."""
    return np.asarray(self.generate_on_device(batch, gen, key))

  def generate_on_device(self, batch: PromptBatch | dict, gen: GenerationConfig, key: jax.Array | None = None
                         ) -> jax.Array:
    """`generate` without the copy to the host: a jax.Array laid out like the batch (global when it is)."""
    _check_arguments(batch, gen, dict_ok=True)
    arrays = self.device_batch(batch, gen) if isinstance(batch, PromptBatch) else batch
    key = jax.random.key(0) if key is None else key
    static, dyn = gen.split()
    return self._generate(self.graphdef, static, self.state, arrays, key, dyn)[0]

  def stream(self, batch: PromptBatch, gen: GenerationConfig, key: jax.Array | None = None
             ) -> Iterator[np.ndarray]:
    """Yields int32[B] new tokens step by step (finished rows yield `pad_id`) until all rows end or N."""
    arrays = self.device_batch(batch, gen)
    key = jax.random.key(0) if key is None else key
    p = batch.input_ids.shape[1]
    static, dyn = gen.split()
    s = self._start(self.graphdef, static, self.state, arrays, key, dyn)
    while True:
      step = int(s.step)
      yield np.asarray(s.tokens[:, p + step - 1])
      if step >= gen.max_new_tokens or bool(jnp.all(s.done)):
        return
      s = self._advance(self.graphdef, static, p, self.state, s, dyn)


def _check_arguments(batch, gen, *, dict_ok: bool) -> None:
  """One line for a batch or config of the wrong type (a list of ids, a dict), which failed deep inside."""
  if not (isinstance(batch, PromptBatch) or (dict_ok and isinstance(batch, dict))):
    raise errors.ConfigError(f"the batch must be a PromptBatch, got {type(batch).__name__}",
                             hint="make_prompt_batch(prompts, images, pad_id=..., image_pad_id=..., image_tokens=...)")
  if not isinstance(gen, GenerationConfig):
    raise errors.ConfigError(f"the generation config must be a GenerationConfig, got {type(gen).__name__}",
                             hint="GenerationConfig(max_new_tokens=..., eos_id=tok.eod_id, pad_id=tok.eod_id)")


def trim(new_tokens: np.ndarray, eos_id: int) -> list[list[int]]:
  """Per row the generated ids up to and including the first eos (the rest is padding)."""
  out = []
  for row in np.asarray(new_tokens):
    hits = np.flatnonzero(row == eos_id)
    out.append(row[:hits[0] + 1].tolist() if hits.size else row.tolist())
  return out
