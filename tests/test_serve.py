"""`python -m qwenvl_jax.serve`'s checks of its flags, in-process: they run before the model loads, so a bad value
is one ConfigError line at once (the subprocess runs of the entry point are in tests/inference)."""
import pytest
from absl import flags

from qwenvl_jax import errors, serve

FLAGS = flags.FLAGS


@pytest.fixture
def parse(monkeypatch):
  """Parses the process-global flags for one test and leaves them unparsed (at their defaults) afterwards."""
  for name in list(FLAGS):  # other test modules import entry points whose absl flags are required
    monkeypatch.setattr(FLAGS[name], "validators", [])
  was_parsed = FLAGS.is_parsed()
  yield lambda argv: FLAGS(["serve", *argv])
  FLAGS.unparse_flags()
  if was_parsed:
    FLAGS.mark_as_parsed()


@pytest.mark.parametrize("flag, expected", [
    ("--max_request_bytes=0", "--max_request_bytes=0 must be >= 1"),
    ("--body_timeout=0", "--body_timeout=0 must be > 0"),
    ("--body_timeout=nan", "--body_timeout=nan must be > 0"),
    ("--send_timeout=-1", "--send_timeout=-1 must be > 0"),
    ("--max_waiting=-1", "--max_waiting=-1 must be >= 0"),
])
def test_request_limits_that_would_refuse_every_request_are_refused_before_loading(parse, tmp_path, flag, expected):
  parse([f"--checkpoint={tmp_path / 'nope'}", flag])  # loading it would fail: the flag's error must come first
  with pytest.raises(errors.ConfigError) as error:
    serve.build()
  assert str(error.value).startswith(expected), error.value
