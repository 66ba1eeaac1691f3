"""`python -m qwenvl_jax.serve`'s checks of its flags: they run before the model loads, so a bad value is one
ConfigError line at once (the other subprocess runs of the entry point are in tests/inference).

The cases run in one child process: the entry points define absl flags of the same names (`--system`, ...), so
importing `qwenvl_jax.serve` into the test process breaks every in-process import of `qwenvl_jax.generate`."""
import subprocess
import sys

import pytest

from tests.training import helpers

_CASES = {
    "--max_request_bytes=0": "--max_request_bytes=0 must be >= 1",
    "--body_timeout=0": "--body_timeout=0 must be > 0",
    "--body_timeout=nan": "--body_timeout=nan must be > 0",
    "--send_timeout=-1": "--send_timeout=-1 must be > 0",
    "--header_timeout=0": "--header_timeout=0 must be > 0",
    "--max_waiting=-1": "--max_waiting=-1 must be >= 0",
}
# Parses each case's flags and prints the first line of serve.build()'s ConfigError (or 'built'), one per line.
_DRIVER = """
import sys
from absl import flags
from qwenvl_jax import errors, serve
for argv in sys.argv[1:]:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["serve", *argv.split(" ")])
  try:
    serve.build()
    print("built")
  except errors.ConfigError as e:
    print(str(e).splitlines()[0])
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
  """flag -> the first line of the error serve.build() raised with it (a checkpoint that does not exist beside it:
  loading it would fail, so the flag's own error must come first)."""
  missing = tmp_path_factory.mktemp("serve") / "nope"
  done = subprocess.run([sys.executable, "-c", _DRIVER, *(f"--checkpoint={missing} {flag}" for flag in _CASES)],
                        capture_output=True, text=True, cwd=helpers.REPO, env=helpers.subprocess_env(devices=1),
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(zip(_CASES, done.stdout.splitlines()))


@pytest.mark.parametrize("flag", list(_CASES))
def test_request_limits_that_would_refuse_every_request_are_refused_before_loading(refusals, flag):
  assert refusals[flag].startswith(_CASES[flag]), refusals[flag]
