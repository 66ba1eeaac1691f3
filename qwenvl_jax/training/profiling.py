"""`config.profile_steps = "a:b"`: a `jax.profiler` trace of training steps a..b-1 in `<workdir>/profile`.

The trace starts before step a is dispatched and stops after step b-1's results are ready (so the last traced
step's device work is inside it). `jax.profiler` writes `profile/plugins/profile/<time>/<host>.xplane.pb`
(TensorBoard's profile tab: `tensorboard --logdir <workdir>/profile`) and `perfetto_trace.json.gz`, which
https://ui.perfetto.dev opens. Every process traces its own host. A run that ends or stops inside the range
stops the trace there. Like Python slices, b is excluded: "10:12" traces steps 10 and 11.

Shapes: none.
"""
from __future__ import annotations

import logging

import jax
from etils import epath

from qwenvl_jax import errors


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """(a, b) of "a:b" with 1 <= a < b, or None for ""; a clear `errors.ConfigError` (a ValueError) otherwise."""
  if not spec:
    return None
  first, sep, last = str(spec).partition(":")
  try:
    a, b = int(first), int(last)
  except ValueError:
    a = b = None
  if not sep or a is None or not 1 <= a < b:
    raise errors.ConfigError(f"config.profile_steps={spec!r}: expected 'a:b' with 1 <= a < b (steps a..b-1 are traced, "
                     "e.g. '10:12')")
  return a, b


class StepProfiler:
  """Starts and stops the trace around the configured steps (a no-op without `profile_steps`)."""

  def __init__(self, spec: str, workdir: str):
    self.range = parse_profile_steps(spec)
    self.directory = str(epath.Path(workdir) / "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    if self.range is not None and step == self.range[0]:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after_step(self, step: int, outputs) -> str | None:
    """Stops after the last traced step (waiting for `outputs`); returns a message for the user then."""
    if self.active and step == self.range[1] - 1:
      jax.block_until_ready(outputs)
      self.stop()
      return f"profiled step(s) {self.range[0]}-{step}: trace in {self.directory}"
    return None

  def stop(self) -> None:
    if self.active:
      self.active = False
      try:
        jax.profiler.stop_trace()
      except RuntimeError as e:  # never let a failed trace hide the run's own outcome
        logging.warning("stopping the profiler trace failed: %s", e)
