"""Continuous batching: one thread owns the device and runs B decode slots; requests join and leave between steps.

Letters: B decode slots, C context (cache slots per row), P prompt bucket, k requests per prefill.

Loop of the engine thread (`Engine._run`):
  1. take new requests and cancellations from the inbox (block when nothing is running);
  2. free the slots of cancelled requests (a client that went away) at once;
  3. admit waiting requests into free slots, up to `prefill_batch` at a time: their images are encoded in one
     call, their prompts prefilled together (right-padded to the length bucket of the longest, the batch padded
     to a prefill-size bucket) and their first tokens sampled; they decode from the next step on. The n choices of
     one request (`submit_all`) prefill their prompt once: the others copy its cache row and pick their first
     token in the next decode call (`_share_key`);
  4. K decode steps (`decode_steps`, one device call) of the first R slots, R the power of two covering the highest
     busy slot (free slots among them compute and are ignored; slots are taken lowest first, so R follows the
     load), attending to the first W cache slots, W the length bucket covering the furthest position reached.
     A request that ends inside the K steps drops the rest of its tokens; one that arrives waits for the call.
Each new token goes to its request's `sink` (a callable; the HTTP layer hands it to its event loop), after the
prompt's own tokens scored by the model when the request asks for them (`PromptTokens`, from the prefill call). A
request ends on a stop token of the chat format (`stop_ids`, not shown), after `max_tokens`, or when cancelled;
its slot is free for the next admission in the same loop turn.

Every program is compiled by `warm_up` (each prefill bucket, each image bucket, each decode size and window, each
copy window), `compile_threads` at a time in a pool of threads; the compile events of the engine thread and of that
pool are counted with `jax.monitoring` (`compile_monitor`) and reported by `stats`, so a recompilation while serving
is visible on `/health`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from qwenvl_jax import serving_defaults as defaults
from qwenvl_jax.inference import decode, slot_programs, slot_sampling
from qwenvl_jax.serving import compile_monitor
from qwenvl_jax.inference.slot_programs import Picked, PromptScores
from qwenvl_jax.serving.slots import Sampling, SlotModel


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's decoding: max_tokens >= 0 (0: the prompt is prefilled and nothing generated, e.g. to score it
  with prompt_logprobs, or to echo it); temperature 0 = greedy; top_k 0 = off; top_p 1 = off; seed;
  ignore_stop_tokens: run to max_tokens whatever is generated (benchmarks; vLLM's `ignore_eos`); logprobs: None
  (off), or how many of the most likely alternatives (0 .. `slot_sampling.TOP_LOGPROBS`) each token's event
  carries beside the token's own log-probability; min_p 0 = off; repetition_penalty 1, frequency_penalty and
  presence_penalty 0 = off (`slot_sampling.penalize`); stop_token_ids: more ids that end the request as the chat
  format's stop tokens do (vLLM's); prompt_logprobs: None (off), or how many alternatives each of the prompt's
  tokens carries beside its own log-probability (vLLM's `prompt_logprobs`; a `PromptTokens` event); logit_bias:
  (token id, bias) pairs added to the logits before sampling (OpenAI's; at most `slot_programs.MAX_LOGIT_BIAS`);
  min_tokens: the ids that end the request (the engine's stop ids and stop_token_ids, at most
  `slot_programs.MAX_STOP_IDS`) cannot be picked before it has generated this many tokens (vLLM's; 0 = off;
  at most max_tokens)."""
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  ignore_stop_tokens: bool = False
  logprobs: int | None = None
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0
  stop_token_ids: frozenset[int] = frozenset()
  prompt_logprobs: int | None = None
  logit_bias: tuple[tuple[int, float], ...] = ()
  min_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Token:
  """A generated token id (never a stop token); with `SamplingParams.logprobs` set, its log-probability under the
  model (`slot_sampling.token_logprobs`) and (id, log-probability) of the most likely tokens, most likely first."""
  token_id: int
  logprob: float | None = None
  top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """The prompt's tokens after the first (the first has nothing before it to be scored by), each with its
  log-probability given the tokens before it and the most likely tokens there (`SamplingParams.prompt_logprobs`
  of them), and its rank there (1 = the most likely): sent once, before the request's first `Token`."""
  tokens: tuple[Token, ...]
  ranks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
  """The end of a request. reason: 'stop' (a stop token), 'length' (max_tokens) or 'cancelled'.
  completion_tokens counts every generated token, the stop token included; stop_token: the stop token that ended
  it (never shown as text), with its scores when the request asked for them."""
  reason: str
  prompt_tokens: int
  completion_tokens: int
  stop_token: Token | None = None


@dataclasses.dataclass(frozen=True)
class Failed:
  message: str


Event = PromptTokens | Token | Finished | Failed


@dataclasses.dataclass(eq=False)
class Request:
  """prompt: token ids (image spans expanded); images: uint8[S, S, 3] in the order of the spans; sink: called
  on the engine thread with each `Event` (must not block)."""
  prompt: Sequence[int]
  images: Sequence[np.ndarray]
  params: SamplingParams
  sink: Callable[[Event], None]
  id: int = dataclasses.field(default_factory=itertools.count().__next__)
  cancelled: bool = False
  cancel_reason: str = "cancelled"  # what `finished_<reason>` counts it as (a stop string ends it as "stop")
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  family: int | None = None  # set by `submit_all` on requests queued together (`Engine._share_key`)


@dataclasses.dataclass(eq=False)
class _Slot:
  request: Request
  last_token: int
  position: int  # the position (= cache slot) where last_token is fed next
  generated: int
  rope_base: float  # dynamic NTK, decided by the prompt length and kept (`decode.rope_bases`)


_families = itertools.count()  # `Request.family` of each `submit_all` call


def _powers_of_two_up_to(n: int) -> tuple[int, ...]:
  out, b = [], 1
  while b < n:
    out.append(b)
    b *= 2
  return tuple(out) + (n,)


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{n} is past the largest bucket {buckets[-1]}")


class Engine:
  """Continuous batching over a `SlotModel` (see the module docstring).

  Args:
    model: a `QwenVL` (its config decides image size and `<imgpad>`).
    num_slots: B, requests decoded together.
    context: C, the most tokens of prompt + answer per request (cache slots per row).
    max_images: the most images one request may hold.
    prefill_batch: the most requests admitted by one prefill (prefill sizes: 1, 2, 4, ... up to it).
    buckets: allowed padded prompt lengths (those below C, and C itself); also the attention windows of decode.
    decode_steps: K, decode steps per device call (more: less host work per token, later admission).
    kv_cache_dtype: None (the compute dtype) or "int8" (`qwen.KVCache`: about half the bytes of bf16, so about
      twice the slots x context in the same memory), as `decode.Generator`'s.
    stop_ids: token ids that end a request (the chat format's `<|im_end|>` etc.); not shown.
    vocab_limit: ids >= this are never produced.
    thread_context: entered by the engine thread around all its work (e.g. `sharding.use_rules(mesh, rules)`:
      context variables do not reach a new thread).
  """

  def __init__(self, model, *, num_slots: int = defaults.NUM_SLOTS, context: int = defaults.CONTEXT,
               max_images: int = defaults.MAX_IMAGES, prefill_batch: int = defaults.PREFILL_BATCH,
               buckets: Sequence[int] = decode.DEFAULT_BUCKETS, stop_ids: Sequence[int] = (),
               vocab_limit: int | None = None, decode_steps: int = defaults.DECODE_STEPS,
               kv_cache_dtype: str | None = None,
               thread_context: Callable[[], contextlib.AbstractContextManager] | None = None,
               compile_threads: int | None = None):
    if num_slots < 1 or prefill_batch < 1 or max_images < 0 or decode_steps < 1:
      raise ValueError(f"need num_slots >= 1, prefill_batch >= 1, max_images >= 0, decode_steps >= 1; got "
                       f"{num_slots}, {prefill_batch}, {max_images}, {decode_steps}")
    if compile_threads is not None and compile_threads < 1:
      raise ValueError(f"compile_threads must be >= 1 (None: the CPU count, at most 8), got {compile_threads}")
    if kv_cache_dtype not in (None, "int8"):
      raise ValueError(f"kv_cache_dtype must be None (the compute dtype) or 'int8', got {kv_cache_dtype!r}")
    self.cfg = model.cfg
    if context > self.cfg.llm.seq_length * 8:
      logging.warning("context %d is far past the model's trained %d tokens", context, self.cfg.llm.seq_length)
    self.num_slots, self.context, self.max_images = num_slots, context, max_images
    self.prefill_sizes = _powers_of_two_up_to(min(prefill_batch, num_slots))
    self.length_buckets = tuple(sorted({b for b in buckets if b < context} | {context}))
    self.image_buckets = _powers_of_two_up_to(max(1, self.prefill_sizes[-1] * max_images))
    self.decode_sizes = _powers_of_two_up_to(num_slots)
    self.decode_steps = decode_steps
    # Warm-up compiles its programs this many at a time (XLA compiles with the GIL released): 2 on 2 cores, at most 8.
    self.compile_threads = compile_threads or max(1, min(8, os.cpu_count() or 1))
    self.stop_ids = frozenset(int(t) for t in stop_ids)
    self._thread_context = thread_context or contextlib.nullcontext
    with self._thread_context():  # the cache is laid out by the rules the engine thread runs under
      self.slots = SlotModel(model, num_slots=num_slots, context=context, feature_slots=self.image_buckets[-1],
                             vocab_limit=vocab_limit, cache_dtype=kv_cache_dtype)
    # What /health reports of the memory layout: weight dtypes (int8/int4 when quantized), the cache's, and the
    # attention of the prefill and image encoding (serve's --attention: xla or splash).
    self.storage = {"weight_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(self.slots.state)}),
                    "kv_cache_dtype": str(self.slots.cache.k.dtype), "attention": model.cfg.attention_impl}
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._waiting: collections.deque[Request] = collections.deque()
    self._active: list[_Slot | None] = [None] * num_slots
    self._compiles = compile_monitor.CompileCounter()
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._ready = threading.Event()
    self._error: BaseException | None = None
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self.warmup_seconds: float | None = None

  # ---- public, any thread -----------------------------------------------------------------------------------

  def start(self, warm_up: bool = True, timeout: float | None = None) -> None:
    """Starts the engine thread (which warms up first) and waits until it serves."""
    self._thread = threading.Thread(target=self._main, args=(warm_up,), name="qwenvl-engine", daemon=True)
    self._thread.start()
    self._ready.wait(timeout)
    if self._error is not None:
      raise RuntimeError(f"the engine failed to start: {self._error}") from self._error

  def shutdown(self) -> None:
    self._stop.set()
    self._inbox.put(None)
    if self._thread is not None:
      self._thread.join()

  def check(self, prompt_len: int, num_images: int, max_tokens: int) -> str | None:
    """Why a request cannot be served (one line), or None."""
    if prompt_len < 1:
      return "the prompt is empty"
    if num_images > self.max_images:
      return f"{num_images} images in the conversation; this server takes at most {self.max_images}"
    if max_tokens < 0:
      return f"max_tokens must be >= 0, got {max_tokens}"
    if prompt_len + max_tokens > self.context:
      return (f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more than the "
              f"context of {self.context} tokens")
    return None

  def submit(self, request: Request) -> None:
    """Queues a request (ValueError when `check` refuses it); its events go to `request.sink`."""
    self.submit_all([request])

  def submit_all(self, requests: Sequence[Request]) -> None:
    """Queues requests together, or none of them (ValueError when `check` refuses one): they reach the queue at
    once, so free slots admit them in the same prefill calls, where requests holding the same images (the n choices
    of one API request) have them encoded once."""
    for request in requests:
      self._validate(request)
    if self._error is not None or self._stop.is_set():
      raise RuntimeError("the engine is not running")
    if len(requests) > 1:
      family = next(_families)
      for request in requests:
        request.family = family
    self._inbox.put(list(requests))

  def _validate(self, request: Request) -> None:
    params = request.params
    problem = self.check(len(request.prompt), len(request.images), params.max_tokens)
    if problem:
      raise ValueError(problem)
    slot_sampling.seed_words(request.params.seed)  # ValueError here, not on the engine thread (which would stop)
    bias = params.logit_bias
    if len(bias) > slot_programs.MAX_LOGIT_BIAS or not all(
        0 <= t < self.cfg.llm.vocab_size and np.isfinite(v) for t, v in bias):
      raise ValueError(f"logit_bias takes at most {slot_programs.MAX_LOGIT_BIAS} (token id, finite bias) pairs of "
                       f"ids in [0, {self.cfg.llm.vocab_size})")
    if not 0 <= params.min_tokens <= params.max_tokens:
      raise ValueError(f"min_tokens must be in [0, max_tokens = {params.max_tokens}], got {params.min_tokens}")
    if problem := self.held_ids_problem(params):
      raise ValueError(problem)
    for name in ("logprobs", "prompt_logprobs"):
      top = getattr(params, name)
      if top is not None and not 0 <= top <= slot_sampling.TOP_LOGPROBS:
        raise ValueError(f"{name} must be None or in [0, {slot_sampling.TOP_LOGPROBS}], got {top}")

  def held_ids(self, params: SamplingParams) -> list[int]:
    """The ids a request holds back until its min_tokens (the prefill's stop_ids, its slot row's
    `slot_programs.TokenHistory.stops`): those that would end it (none without min_tokens or with
    ignore_stop_tokens)."""
    if not params.min_tokens or params.ignore_stop_tokens:
      return []
    return sorted(i for i in set(self.stop_ids) | set(params.stop_token_ids) if i < self.cfg.llm.vocab_size)

  def held_ids_problem(self, params: SamplingParams) -> str | None:
    """Why a request's `held_ids` do not fit its slot row (one line), or None."""
    if len(self.held_ids(params)) > slot_programs.MAX_STOP_IDS:
      return (f"with min_tokens, at most {slot_programs.MAX_STOP_IDS} stop token ids (the chat format's "
              f"{len(self.stop_ids)} and stop_token_ids) can be held back")
    return None

  def cancel(self, request: Request, reason: str = "cancelled") -> None:
    """Frees the request's slot at the next loop turn (no more events are sent). reason: how `stats` counts the
    end ("cancelled": the client went away; "stop": the API side ended it on a stop string)."""
    request.cancel_reason = reason
    request.cancelled = True
    self._inbox.put(("cancel", request))

  def stats(self) -> dict:
    """Slots in use, queue length, counters and the engine thread's compile counts (see `compile_monitor`).

    decode_seconds / prefill_seconds: wall time the engine thread spent in decode calls / in image encoding and
    prefill calls, each waited for to its result (on a CPU backend: the computation itself). With decoded_tokens
    they say how much of the wall time the device worked and what the decode calls alone would deliver.
    finished_<reason>: requests that held a slot and ended (stop, length, cancelled); cancelled_waiting: requests
    cancelled before they got one; images_encoded: images through the vision tower (once per prefill call for
    requests that share them); prompts_shared: requests admitted on a copy of another's prefilled prompt
    (`_share_key`) instead of a prefill row of their own."""
    with self._lock:  # active and the finished counts of one moment: `_finish` changes both under the lock
      counts = dict(self._counts)
      active = sum(s is not None for s in self._active)
    return {"slots": self.num_slots, "active": active,
            "waiting": len(self._waiting), "context": self.context, "ready": self._ready.is_set(),
            "healthy": self._error is None, "warmup_seconds": self.warmup_seconds,
            "compilations": self._compiles.snapshot(), **self.storage, **counts}

  # ---- engine thread ----------------------------------------------------------------------------------------

  def _main(self, warm_up: bool) -> None:
    self._compiles.attach()
    try:
      with self._thread_context():
        self._serve(warm_up)
    except BaseException as e:  # pylint: disable=broad-except  (reported to every waiting request)
      logging.exception("engine thread failed")
      self._error = e
      self._ready.set()
      for slot in self._active:
        if slot is not None:
          slot.request.sink(Failed(f"engine failure: {e}"))
      for request in self._waiting:
        request.sink(Failed(f"engine failure: {e}"))
    finally:
      self._compiles.detach()

  def _serve(self, warm_up: bool) -> None:
    if warm_up:
      t0 = time.monotonic()
      self._warm_up()
      self.warmup_seconds = round(time.monotonic() - t0, 3)
    self._compiles.mark()
    self._ready.set()
    self._run()

  def _warm_up(self) -> None:
    """Compiles every program the loop can call (each image bucket, each (prefill size, length bucket), each decode
    size and window, each copy window), `compile_threads` at a time, then calls each once on dummy inputs (they
    find their programs compiled; a prefill or copy to a row past the cache, or of row 0 onto itself while the cache
    is empty, writes nothing)."""
    s = self.cfg.vision.image_size
    drop = self.num_slots  # a row index past the cache: prefill writes nothing
    calls = [functools.partial(self.slots.encode, np.zeros((n, s, s, 3), np.uint8)) for n in self.image_buckets]
    for k in self.prefill_sizes:
      for p in self.length_buckets:
        calls.append(functools.partial(
            self.slots.prefill, np.zeros((k, p), np.int32), np.ones(k, np.int32), np.zeros(k, np.int32),
            self.slots.no_features, np.full(k, drop, np.int32), np.full(k, self.cfg.llm.rope_base, np.float32),
            _sampling([SamplingParams(1)] * k, [0] * k)))
    for b in self.decode_sizes:
      for w in self.length_buckets:
        calls.append(functools.partial(
            self.slots.decode, np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, bool),
            np.full(b, self.cfg.llm.rope_base, np.float32),
            _sampling([SamplingParams(1, temperature=1.0)] * b, [0] * b), steps=self.decode_steps, window=w))
    calls += [functools.partial(self.slots.copy_prompt, 0, 0, window=w) for w in self.length_buckets]
    if self.compile_threads > 1:
      with concurrent.futures.ThreadPoolExecutor(self.compile_threads, thread_name_prefix="qwenvl-compile") as pool:
        for done in [pool.submit(self._compile_in_thread, call) for call in calls]:
          done.result()  # the first failure is raised here, in the engine thread
    for call in calls:
      jax.block_until_ready(call())

  def _compile_in_thread(self, call: Callable[..., Any]) -> None:
    """`call(compile_only=True)` in a thread of the warm-up's pool, under the engine thread's layout, its compile
    events counted with the engine thread's."""
    self._compiles.attach()
    try:
      with self._thread_context():
        call(compile_only=True)
    finally:
      self._compiles.detach()

  def _run(self) -> None:
    while not self._stop.is_set():
      idle = not self._waiting and all(s is None for s in self._active)
      self._drain(block=idle)
      if self._stop.is_set():
        return
      self._admit()
      if any(s is not None for s in self._active):
        self._step()

  def _drain(self, block: bool) -> None:
    while True:
      try:
        item = self._inbox.get(block=block, timeout=0.5 if block else None)
      except queue.Empty:
        return
      block = False
      if item is None:
        return
      if isinstance(item, list):  # `submit_all`'s requests
        self._waiting.extend(item)  # one already cancelled is dropped and counted by `_free_cancelled`
      # A ("cancel", request) item only wakes the loop; the flag is read by `_free_cancelled`.

  def _free_cancelled(self) -> None:
    for i, slot in enumerate(self._active):
      if slot is not None and slot.request.cancelled:
        self._finish(i, slot.request.cancel_reason, notify=False)
    kept = collections.deque()
    for r in self._waiting:
      if r.cancelled:
        self._count("cancelled_waiting")  # its client left before it got a slot
      else:
        kept.append(r)
    self._waiting = kept

  def _count(self, name: str) -> None:
    with self._lock:
      self._counts[name] += 1

  def _finish(self, i: int, reason: str, notify: bool = True, stop_token: Token | None = None) -> None:
    slot = self._active[i]
    with self._lock:  # `stats` never sees the slot free and its request not yet counted
      self._active[i] = None
      self._counts[f"finished_{reason}"] += 1
    if notify:  # a cancelled request (its client left, or the API ended it on a stop string) gets no event
      slot.request.sink(Finished(reason, len(slot.request.prompt), slot.generated, stop_token))

  def _admit(self) -> None:
    self._free_cancelled()
    free = [i for i, s in enumerate(self._active) if s is None]
    while free and self._waiting:
      # In queue order: a request sharing the prompt of one already in the group follows it (no prefill row);
      # the others are prefilled, up to the largest prefill size.
      group, followers, leaders = [], [], {}
      while self._waiting and len(group) + len(followers) < len(free):
        r = self._waiting[0]
        key = self._share_key(r)
        if key in leaders:
          followers.append((r, leaders[key]))
        elif len(group) < self.prefill_sizes[-1]:
          if key is not None:
            leaders[key] = len(group)
          group.append(r)
        else:
          break
        self._waiting.popleft()
      taken = len(group) + len(followers)
      rows, free = free[:taken], free[taken:]
      self._prefill(group, rows[:len(group)], list(zip(followers, rows[len(group):])))

  def _share_key(self, r: Request):
    """What a request shares its prefill with: the requests of one `submit_all` (the n choices of an API request)
    with the same prompt, the same images and the same sampling but for the seed, or None (it prefills its own).
    The first of them is prefilled; the others copy its cache row (`SlotModel.copy_prompt`, the prompt's keys and
    values, its token history) and feed the prompt's last token in the next decode call, where each picks its first
    token with its own seed: equal to a prefill's pick up to float round-off (one position computed against the
    cache instead of the whole prompt at once). A prompt ending inside an image span prefills its own (the last
    token's input is an image feature)."""
    if r.family is None or r.prompt[-1] == self.cfg.image_pad_id:
      return None
    return r.family, tuple(r.prompt), tuple(id(image) for image in r.images), dataclasses.replace(r.params, seed=0)

  def _prefill(self, group: list[Request], rows: list[int],
               followers: Sequence[tuple[tuple[Request, int], int]] = ()) -> None:
    """Prefills `group` into cache `rows`; each ((request, i), row) of `followers` takes a copy of group[i]'s."""
    k = _bucket(len(group), self.prefill_sizes)
    p = _bucket(max(len(r.prompt) for r in group), self.length_buckets)
    ids = np.zeros((k, p), np.int32)
    lengths = np.ones(k, np.int32)
    first_image = np.zeros(k, np.int32)
    bias = slot_programs.no_bias(k, self.cfg.llm.vocab_size)
    stop_ids = slot_programs.no_stops(k, self.cfg.llm.vocab_size)
    images, start = [], {}
    for i, r in enumerate(group):
      ids[i, :len(r.prompt)] = r.prompt  # right-padded (`slot_programs.prefill`)
      lengths[i] = len(r.prompt)
      for j, (token, value) in enumerate(r.params.logit_bias):
        bias[0][i, j], bias[1][i, j] = token, value
      held = self.held_ids(r.params)
      stop_ids[i, :len(held)] = held
      # Requests holding the same image arrays (the n choices of one API request share their prompt's) take the
      # same features: each image is encoded once (ViT-bigG at 448 px: some 4 TFLOP per image).
      key = tuple(id(image) for image in r.images)
      if key not in start:
        start[key] = len(images)
        images.extend(r.images)
      first_image[i] = start[key]
    t0 = time.perf_counter()  # device work from here: image encoding and prefill
    if images:
      n = _bucket(len(images), self.image_buckets)
      s = self.cfg.vision.image_size
      batch = np.zeros((n, s, s, 3), np.uint8)
      batch[:len(images)] = np.stack(images)
      feats = self.slots.encode(batch)
    else:
      feats = self.slots.no_features
    row_index = np.full(k, self.num_slots, np.int32)
    row_index[:len(group)] = rows
    rope = decode.rope_bases(lengths, self.cfg, True)
    params = [r.params for r in group] + [SamplingParams(1)] * (k - len(group))
    picked = self.slots.prefill(ids, lengths, first_image, feats, row_index, rope, _sampling(params, [0] * k),
                                bias, stop_ids)
    for (r, i), row in followers:
      if r.params.max_tokens:  # row `row` holds group[i]'s prompt, its last token still to be fed
        self.slots.copy_prompt(rows[i], row, window=_bucket(len(r.prompt), self.length_buckets))
    picked = _fetch(picked, params)
    with self._lock:
      self._counts["prefill_seconds"] += time.perf_counter() - t0
      self._counts["prefills"] += 1
      self._counts["admitted"] += len(group) + len(followers)
      self._counts["prompts_shared"] += len(followers)
      self._counts["images_encoded"] += len(images)
    joining = [(r, i, row, _Slot(r, int(picked.tokens[i]), len(r.prompt), 0, float(rope[i])))
               for i, (r, row) in enumerate(zip(group, rows))]
    # A follower feeds the prompt's last token (at its position, len - 1) in the next decode call: its first pick.
    joining += [(r, i, row, _Slot(r, r.prompt[-1], len(r.prompt) - 1, 0, float(rope[i])))
                for (r, i), row in followers]
    for r, i, row, slot in joining:
      self._active[row] = slot
      if r.params.prompt_logprobs is not None and not r.cancelled:
        r.sink(_prompt_tokens(r, picked.prompt, i))
      if r.params.max_tokens == 0:  # nothing to generate: the prompt (its scores, its echo) is the whole answer
        self._finish(row, r.cancel_reason if r.cancelled else "length", notify=not r.cancelled)
      elif slot.position == len(r.prompt):  # prefilled: its first token is picked
        self._deliver(row, picked, i)

  def _step(self) -> None:
    # Slots are taken lowest index first, so the busy ones gather at the front: decode only a bucket covering them.
    b = _bucket(max(i for i, s in enumerate(self._active) if s is not None) + 1, self.decode_sizes)
    k = self.decode_steps
    reach = max(s.position for s in self._active if s is not None) + k  # one past the last slot written
    window = _bucket(min(reach, self.context), self.length_buckets)
    tokens = np.zeros(b, np.int32)
    positions = np.zeros(b, np.int32)
    active = np.zeros(b, bool)
    rope = np.full(b, self.cfg.llm.rope_base, np.float32)
    params, counts = [], []
    for i, slot in enumerate(self._active[:b]):
      if slot is None:
        params.append(SamplingParams(1))
        counts.append(0)
        continue
      tokens[i], positions[i], active[i] = slot.last_token, slot.position, True
      rope[i] = slot.rope_base
      params.append(slot.request.params)
      counts.append(slot.generated)
    t0 = time.perf_counter()
    picked = _fetch(self.slots.decode(tokens, positions, active, rope, _sampling(params, counts), steps=k,
                                      window=window), params)
    seconds = time.perf_counter() - t0
    delivered = 0
    for i, slot in enumerate(self._active[:b]):
      for j in range(k if slot is not None else 0):
        if self._active[i] is not slot:  # ended (stop, length, cancelled) at an earlier step of this call
          break
        slot.position += 1
        slot.last_token = int(picked.tokens[j, i])
        self._deliver(i, picked, (j, i))
        delivered += 1
    with self._lock:
      self._counts["decode_seconds"] += seconds
      self._counts["decode_calls"] += 1
      self._counts["decoded_tokens"] += delivered

  def _deliver(self, i: int, picked: Picked, at) -> None:
    """Slot i's token at index `at` of the host arrays `picked` (`_fetch`)."""
    slot = self._active[i]
    if slot.request.cancelled:
      self._finish(i, slot.request.cancel_reason, notify=False)
      return
    slot.generated += 1
    token = int(picked.tokens[at])
    params = slot.request.params
    top = params.logprobs
    event = Token(token) if top is None else Token(
        token, float(picked.logprob[at]), tuple(zip(picked.top_ids[at][:top].tolist(),
                                                    picked.top_logprobs[at][:top].tolist())))
    if (token in self.stop_ids or token in params.stop_token_ids) and not params.ignore_stop_tokens:
      self._finish(i, "stop", stop_token=event)
      return
    slot.request.sink(event)
    if slot.generated >= slot.request.params.max_tokens:
      self._finish(i, "length")


def _sampling(params: Sequence[SamplingParams], counts: Sequence[int]) -> Sampling:
  return Sampling(temperature=np.asarray([p.temperature for p in params], np.float32),
                  top_k=np.asarray([p.top_k for p in params], np.int32),
                  top_p=np.asarray([p.top_p for p in params], np.float32),
                  seed=np.asarray([slot_sampling.seed_words(p.seed) for p in params], np.uint32).reshape(-1, 2),
                  count=np.asarray(counts, np.int32),
                  logprobs=np.asarray([p.logprobs is not None for p in params], bool),
                  min_p=np.asarray([p.min_p for p in params], np.float32),
                  repetition=np.asarray([p.repetition_penalty for p in params], np.float32),
                  frequency=np.asarray([p.frequency_penalty for p in params], np.float32),
                  presence=np.asarray([p.presence_penalty for p in params], np.float32),
                  prompt_logprobs=np.asarray([p.prompt_logprobs is not None for p in params], bool),
                  min_tokens=np.asarray([p.min_tokens for p in params], np.int32))


def _fetch(picked: Picked, params: Sequence[SamplingParams]) -> Picked:
  """The device's picks as host arrays; the log-probabilities, and a prefill's prompt scores, only when some row
  asked for them (else None)."""
  scores = (None,) * 3
  if any(p.logprobs is not None for p in params):
    scores = tuple(np.asarray(x) for x in picked[1:4])
  prompt = None
  if picked.prompt is not None and any(p.prompt_logprobs is not None for p in params):
    prompt = PromptScores(*(np.asarray(x) for x in picked.prompt))
  return Picked(np.asarray(picked.tokens), *scores, prompt)


def _prompt_tokens(request: Request, scores: PromptScores, i: int) -> PromptTokens:
  """Row i's `PromptTokens` from the host arrays `scores` (`_fetch`)."""
  top, n = request.params.prompt_logprobs, len(request.prompt)
  ids, logprob = scores.top_ids[i, 1:n, :top].tolist(), scores.logprob[i, 1:n].tolist()
  top_lp = scores.top_logprobs[i, 1:n, :top].tolist()
  return PromptTokens(tuple(Token(int(t), lp, tuple(zip(a, b)))
                            for t, lp, a, b in zip(request.prompt[1:], logprob, ids, top_lp)),
                      tuple(scores.rank[i, 1:n].tolist()))
