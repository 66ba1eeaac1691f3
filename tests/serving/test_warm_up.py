"""The engine's warm-up compiles its programs several at a time (`Engine(compile_threads=...)`, serve's
`--compile_threads`), in a pool of threads, then calls each once: every program is lowered once, in the pool, and
the engine thread finds them all compiled."""
import threading

import jax
import pytest

from qwenvl_jax.serving import Engine, Failed, Finished, Request, SamplingParams, Token, compile_monitor
from tests.serving.conftest import chat_stops


def _answer(engine, prompt, tokens=6):
  done, out = threading.Event(), []

  def sink(event):
    out.append(event)
    if isinstance(event, (Finished, Failed)):
      done.set()
  engine.submit(Request(prompt, [], SamplingParams(tokens, ignore_stop_tokens=True), sink))
  assert done.wait(120), out
  assert isinstance(out[-1], Finished), out[-1]
  return [e.token_id for e in out if isinstance(e, Token)]


def test_warm_up_compiles_each_program_once_in_its_pool_and_answers_as_one_thread(serve_model, serve_tok):
  lowered_by: list[str] = []
  recording = [True]

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if recording[0] and event == compile_monitor.LOWERING_EVENT:
      lowered_by.append(threading.current_thread().name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  sizes = dict(num_slots=2, context=128, max_images=1, prefill_batch=1, buckets=(64,),
               stop_ids=chat_stops(serve_tok), vocab_limit=serve_tok.vocab_size)
  try:
    pooled = Engine(serve_model, compile_threads=3, **sizes)
    pooled.start()
  finally:
    recording[0] = False
    jax.monitoring.unregister_event_duration_listener(listener)
  try:
    # 1 image bucket + 1 prefill size x 2 length buckets + 2 decode sizes x 2 windows + 2 copy windows.
    programs = 1 + 2 + 4 + 2
    compiles = pooled.stats()["compilations"]
    assert compiles["lowerings"] == programs, compiles
    # The pool lowered them all; the engine thread's calls that followed lowered nothing (the constructor's own
    # programs, the empty cache and history, were lowered by this thread).
    pool = [name for name in lowered_by if name.startswith("qwenvl-compile")]
    assert len(pool) == programs and "qwenvl-engine" not in lowered_by, lowered_by
    assert len(set(pool)) > 1, pool  # more than one thread of the pool compiled
    prompt = serve_tok.encode("the red circle")
    pooled_answer = _answer(pooled, prompt)
    assert pooled.stats()["compilations"]["lowerings_after_warmup"] == 0
  finally:
    pooled.shutdown()
  single = Engine(serve_model, compile_threads=1, **sizes)
  single.start()
  try:
    assert _answer(single, prompt) == pooled_answer
  finally:
    single.shutdown()


def test_compile_threads_below_one_is_refused(serve_model):
  with pytest.raises(ValueError, match="compile_threads must be >= 1"):
    Engine(serve_model, num_slots=1, context=64, compile_threads=0)
