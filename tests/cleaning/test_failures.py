"""A user error raised on a worker comes back from the text a runner passes on, and its traceback stays quiet."""
import io
import traceback

import pytest

from qwenvl_jax import errors
from qwenvl_jax.cleaning import failures
from qwenvl_jax.cleaning.pipeline import NoPairsKeptError


def _raises(error):
  raise error


def _worker_traceback(error: errors.UserError) -> str:
  """The text a worker process sends back for `error` raised in a wrapped DoFn, after Beam added the step's name
  (DoFnRunner._reraise_augmented builds the same type from `args[0]` + the annotation)."""
  try:
    failures.carry_user_errors(_raises)(error)
  except failures.CarriedUserError as carried:
    augmented = type(carried)(carried.args[0] + " [while running 'CleanPairs/ReadShards']")
    try:
      raise augmented from carried
    except failures.CarriedUserError:
      return traceback.format_exc()
  raise AssertionError("not raised")


@pytest.mark.parametrize("error", [
    errors.InputFormatError("input shard a.jsonl.gz cannot be read after row 3", "re-download it"),
    errors.ConfigError("scorer spec 'clip:/ckpt' names no checkpoint folder"),
    NoPairsKeptError("all 3 input pairs were rejected", "read the report"),
])
def test_a_user_error_comes_back_from_the_text_of_a_workers_traceback(error):
  rebuilt = failures.user_error_in(RuntimeError(_worker_traceback(error)))
  assert type(rebuilt) is type(error)
  assert (rebuilt.message, rebuilt.hint) == (error.message, error.hint)


def test_generators_carry_too_and_other_errors_pass_as_they_are():
  def rows():
    yield 1
    raise errors.InputFormatError("cut short")
  with pytest.raises(failures.CarriedUserError) as raised:
    list(failures.carry_user_errors(rows)())
  assert str(failures.user_error_in(raised.value)) == "cut short"
  with pytest.raises(ZeroDivisionError):
    failures.carry_user_errors(lambda: 1 / 0)()
  assert failures.user_error_in(RuntimeError("Traceback ...\nZeroDivisionError: division by zero")) is None


def test_a_class_not_imported_here_comes_back_as_a_user_error_without_importing_it():
  text = _worker_traceback(errors.ConfigError("bad", "fix it")).replace("qwenvl_jax.errors.ConfigError",
                                                                        "os_plugin.Mistake")
  rebuilt = failures.user_error_in(RuntimeError(text))
  assert type(rebuilt) is errors.UserError and (rebuilt.message, rebuilt.hint) == ("bad", "fix it")


def test_the_harness_print_of_a_quiet_failure_is_dropped_and_other_writes_pass():
  out = io.StringIO()
  stream = failures.QuietStream(out)
  print("progress 1/2", file=stream)
  print(_worker_traceback(errors.InputFormatError("cut short")), file=stream)  # the traceback, then "\n"
  print("Traceback (most recent call last):\nValueError: an internal error", file=stream)
  assert out.getvalue() == "progress 1/2\nTraceback (most recent call last):\nValueError: an internal error\n"
