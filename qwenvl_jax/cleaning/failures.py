"""Failures of the cleaning job that end as one line: a user's mistake found on a Beam worker (a truncated shard, a
scorer checkpoint a worker cannot load) and TFDS's refusal of an empty split; carried back from the workers and
kept off the console.

On the in-process runner a DoFn's exception reaches `run_clean` as itself. Worker processes
(`direct_running_mode=multi_processing`) and the gRPC workers of `multi_threading` send back only the text of the
worker's traceback (`RuntimeError: Traceback ...`), after the worker logged that traceback and printed it on its
stderr; remote runners report at most that text. So:
* `carry_user_errors` wraps the job's DoFn code: an `errors.UserError` leaves it as a `CarriedUserError`, whose
  message is the error's line followed by its class and arguments (JSON), and `user_error_in` rebuilds the error
  from an exception or the text of one, whatever the runner;
* `is_quiet` tells a log record or a text of such a failure; `quiet_failures()` drops those records from Beam's
  loggers and those writes from `sys.stderr` of this process, `QuietStream` from a worker's stderr
  (`local_runner`). Every other record and write passes.
"""
import contextlib
import functools
import inspect
import json
import logging
import sys
from typing import Callable, Iterator, TextIO

from qwenvl_jax import errors

# TFDS's refusal to write an empty split, which run_clean handles (`NoPairsKeptError`).
EMPTY_DATASET = "number of generated examples is 0"
# Starts the JSON of a carried error inside its message.
_MARK = " [qwenvl_jax user error "
# The loggers a failed DoFn is reported on with its traceback: the DoFn runner (`_LOGGER.exception` before
# re-raising it with the step's name), the bundle processor, the SDK harness ("Error processing instruction ..."),
# and the local job service, which logs what its worker processes send ("Worker: ...").
_BEAM_ERROR_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.bundle_processor",
                       "apache_beam.runners.worker.sdk_worker", "apache_beam.runners.portability.local_job_service")


class CarriedUserError(RuntimeError):
  """An `errors.UserError` raised in the job's DoFn code, as a message any runner passes on: the error's own line,
  then its class and arguments as JSON (`user_error_in` reads them back)."""

  @classmethod
  def of(cls, error: errors.UserError) -> "CarriedUserError":
    what = {"class": f"{type(error).__module__}.{type(error).__qualname__}", "args": list(error.args)}
    return cls(f"{error}{_MARK}{json.dumps(what, default=str)}]")


def carry_user_errors(fn: Callable) -> Callable:
  """`fn` (a function or a generator function run on Beam workers) with an `errors.UserError` it raises turned into
  a `CarriedUserError`."""
  if inspect.isgeneratorfunction(fn):
    @functools.wraps(fn)
    def generator(*args, **kwargs):
      try:
        yield from fn(*args, **kwargs)
      except errors.UserError as e:
        raise CarriedUserError.of(e) from e
    return generator

  @functools.wraps(fn)
  def function(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except errors.UserError as e:
      raise CarriedUserError.of(e) from e
  return function


def user_error_in(error: BaseException | None) -> errors.UserError | None:
  """The `errors.UserError` that `error`, or an exception it was raised from, carries in its message (the runner's
  RuntimeError holds the worker's traceback as text), rebuilt; None when there is none."""
  seen = set()
  while error is not None and id(error) not in seen:
    found = _rebuild(str(error))
    if found is not None:
      return found
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _rebuild(text: str) -> errors.UserError | None:
  start = text.find(_MARK)
  if start < 0:
    return None
  try:
    what, _ = json.JSONDecoder().raw_decode(text, start + len(_MARK))
    module, _, name = what["class"].rpartition(".")
    args = list(what["args"])
  except (ValueError, KeyError, TypeError, AttributeError):
    return None
  # Only a class already imported here (the job's own modules are), never an import the text asks for.
  cls = getattr(sys.modules.get(module), name, None)
  if isinstance(cls, type) and issubclass(cls, errors.UserError):
    try:
      return cls(*args)
    except TypeError:
      pass
  message, hint = (args + [None, None])[:2]
  return errors.UserError(str(message), None if hint is None else str(hint))


def is_quiet(text: str) -> bool:
  """Whether `text` (a log message, a traceback) reports a failure the job ends with one line."""
  return _MARK in text or EMPTY_DATASET in text


def keep_record(record: logging.LogRecord) -> bool:
  """A logging filter: False for Beam's records of a failure that ends as one line (and of Ctrl-C, which the
  command prints as 'interrupted')."""
  if record.exc_info and isinstance(record.exc_info[1], (errors.UserError, KeyboardInterrupt)):
    return False
  return not is_quiet(record.getMessage())


class QuietStream:
  """A text stream that passes every write to `stream` but those of a failure that ends as one line (Beam's SDK
  harness prints the traceback of a failed bundle on stderr itself, and the newline after it)."""

  def __init__(self, stream: TextIO):
    self._stream = stream
    self._dropped = False

  def write(self, text: str) -> int:
    dropped, self._dropped = self._dropped, is_quiet(text)
    if self._dropped or (dropped and text == "\n"):
      return len(text)
    return self._stream.write(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_failures() -> Iterator[None]:
  """While the dataset is built: Beam's logs of the failures that end as one line are dropped from its loggers,
  and the tracebacks of failed bundles that Beam's in-process gRPC workers (`multi_threading`) print from this
  process's stderr; every other record and write passes."""
  loggers = [logging.getLogger(name) for name in _BEAM_ERROR_LOGGERS]
  for logger in loggers:
    logger.addFilter(keep_record)
  try:
    with contextlib.redirect_stderr(QuietStream(sys.stderr)):
      yield
  finally:
    for logger in loggers:
      logger.removeFilter(keep_record)
