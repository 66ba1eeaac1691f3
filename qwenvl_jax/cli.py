"""How every entry point runs: `cli.run(main)` in place of `absl.app.run(main)`.

On top of absl it gives every command the same behaviour at its edges:
* a user mistake (`errors.UserError`, or an OS error about a path the user named: missing, existing, a folder for
  a file, no permission, disk full) prints one line `error: ...` (plus `  hint: ...`) on stderr and exits 2;
  anything else is an internal error and keeps its traceback. `QWENVL_TRACEBACK=1` shows the traceback of user
  mistakes too;
* a misspelt config override (`--config.optimizer.learning_rate=...`) names the unknown field and the closest
  existing ones ("did you mean optimizer.lr?") instead of ml_collections' bare `AttributeError`;
* `--help` / `--helpfull` exit 0 (absl exits 1).
"""

from __future__ import annotations

import difflib
import errno
import functools
import importlib.util
import os
import sys
from typing import Callable

from absl import app

from qwenvl_jax import errors

_HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")
# OS errors that are about a path or resource the user controls (the message names the path).
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is a user mistake (printed as one line) rather than an internal error (a traceback)."""
  if isinstance(error, (errors.UserError, _USER_OS_ERRORS)):
    return True
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def report(error: BaseException) -> int:
  """Prints `error` as one user-facing message on stderr; returns the exit status to use."""
  print(errors.format_user_error(error), file=sys.stderr, flush=True)
  return errors.USER_ERROR_EXIT_CODE


def quiet_libraries() -> None:
  """Shows only warnings and errors of absl, orbax and JAX unless `--verbosity` was given.

  At INFO, orbax logs every restore step and JAX logs "Unable to initialize backend 'tpu'" on any machine without
  one: lines that bury a command's own output (the answer of `generate`).
  """
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  for name in ("jax", "jax._src.xla_bridge", "orbax", "absl"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
  """`absl.app.run(main)` with the behaviour of the module docstring; never returns (exits)."""
  argv = list(sys.argv if argv is None else argv)
  started = []

  @functools.wraps(main)
  def guarded(args):
    started.append(True)
    try:
      return main(args)
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e) or os.environ.get("QWENVL_TRACEBACK"):
        raise
      sys.exit(report(e))

  try:
    app.run(guarded, argv=argv)
  except SystemExit as e:
    if not started and e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Raised while absl parses the flags (main has not started): ml_collections reports an unknown override
    # field as a bare AttributeError / KeyError.
    message = None if started else config_override_error(argv)
    if message is None:
      raise
    sys.exit(report(errors.ConfigError(message)))


def config_override_error(argv: list[str]) -> str | None:
  """The message for the first `--NAME.path=value` override of argv whose path is not a field of the config that
  `--NAME=FILE[:ARG]` loads (with the closest existing field names), or None when every override is a field."""
  files = {}
  for a in argv[1:]:
    name, eq, value = a.lstrip("-").partition("=")
    if eq and "." not in name and (value.endswith(".py") or ".py:" in value):
      files[name] = value
  for a in argv[1:]:
    key = a.lstrip("-").partition("=")[0]
    base, dot, path = key.partition(".")
    if not dot or base not in files:
      continue
    try:
      config = _load_config(files[base])
    except Exception:  # pylint: disable=broad-except  (the config file's own error shows elsewhere)
      return None
    node, walked = config, []
    for part in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(walked)
        close = _closest(part, keys)
        prefix = f"{base}.{where}." if where else f"{base}."
        hint = f"; did you mean {', '.join('--' + prefix + c for c in close)}?" if close else ""
        scope = f"{base}.{where}" if where else base
        return (f"--{key}: {scope} has no field {part!r}{hint} (fields of {scope}: {', '.join(sorted(keys))})"
                if keys else f"--{key}: {scope} is a value, not a group of fields")
      node, walked = node[part], walked + [part]
  return None


def _closest(name: str, keys: list[str]) -> list[str]:
  """Up to 3 keys close to `name`: its initials first (learning_rate -> lr), then difflib's closest."""
  initials = "".join(w[:1] for w in name.split("_") if w)
  first = [k for k in keys if len(name.split("_")) > 1 and k == initials]
  return (first + [k for k in difflib.get_close_matches(name, keys, n=3, cutoff=0.5) if k not in first])[:3]


def _load_config(spec: str):
  """`get_config(arg)` of the config file `PATH[:ARG]`, loaded by path as ml_collections' config_flags does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_qwenvl_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if arg:
    return module.get_config(arg)
  try:
    return module.get_config()
  except TypeError:  # get_config(arg) with a required argument: config_flags passes None when there is none
    return module.get_config(None)
