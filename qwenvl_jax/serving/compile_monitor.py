"""Counting XLA compilations with JAX's own monitoring events (`jax.monitoring`), per thread.

JAX reports every new program it lowers (`/jax/core/compile/jaxpr_to_mlir_module_duration`: a jit cache miss,
whether or not the persistent compilation cache then spares the backend compile) and every backend compile
(`/jax/core/compile/backend_compile_duration`). A server must show neither after warm-up: a recompilation in
the middle of serving stalls every slot for seconds. Listeners are process-global and cannot be removed one by
one, so one listener is installed once and dispatches to the counters of the threads that asked; events from
other threads (a test's own jit calls) are not counted.
"""

from __future__ import annotations

import collections
import threading

import jax

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_counters: dict[int, "CompileCounter"] = {}
_installed = False


def _listener(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event not in (LOWERING_EVENT, BACKEND_COMPILE_EVENT):
    return
  counter = _counters.get(threading.get_ident())
  if counter is not None:
    counter.record(event)


class CompileCounter:
  """Counts the compile events of the thread that calls `attach` (the engine thread)."""

  def __init__(self):
    self._counts: collections.Counter = collections.Counter()
    self._mark: collections.Counter = collections.Counter()
    self._lock = threading.Lock()

  def attach(self) -> None:
    """Counts from now on the events raised by the calling thread."""
    global _installed
    with _lock:
      if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True
      _counters[threading.get_ident()] = self

  def detach(self) -> None:
    with _lock:
      _counters.pop(threading.get_ident(), None)

  def record(self, event: str) -> None:
    with self._lock:
      self._counts[event] += 1

  def mark(self) -> None:
    """Remembers the counts now (the end of warm-up): `snapshot` reports what came after."""
    with self._lock:
      self._mark = collections.Counter(self._counts)

  def snapshot(self) -> dict[str, int]:
    """{'lowerings', 'backend_compiles'} in total and '..._after_warmup' since `mark`."""
    with self._lock:
      c, m = self._counts, self._mark
      return {"lowerings": c[LOWERING_EVENT], "backend_compiles": c[BACKEND_COMPILE_EVENT],
              "lowerings_after_warmup": c[LOWERING_EVENT] - m[LOWERING_EVENT],
              "backend_compiles_after_warmup": c[BACKEND_COMPILE_EVENT] - m[BACKEND_COMPILE_EVENT]}
