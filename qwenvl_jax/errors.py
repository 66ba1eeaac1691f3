"""User mistakes as exceptions: one clear line (plus a hint) and a non-zero exit, never a traceback.

`UserError` marks an error the user can fix (a bad flag or config value, a missing or malformed input file, a
workdir clash, an output that already exists); anything else is an internal error and keeps its traceback. The
entry points (`qwenvl_jax/*.py`, through `qwenvl_jax.cli.run`) print a `UserError` as

    error: <message>
      hint: <hint>

and exit with status 2. This module imports nothing from the project, so every layer (model, text, data,
checkpoint, training, ...) may raise these. The subclasses also derive from the built-in type that callers and
tests already catch (`ConfigError` is a `ValueError`, `UserFileExistsError` a `FileExistsError`, ...).

Every class here pickles with all its arguments, so an error raised in a grain worker process reaches the trainer
intact (pickling an exception calls its class with `self.args`, which must therefore be the constructor's
arguments).
"""

from __future__ import annotations

import difflib

# Exit status of a user mistake (absl's usage errors exit 1; 2 is the conventional "bad usage" of CLI tools).
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
  """A mistake the user can fix; `str(e)` is the one-line message, `e.hint` an optional suggestion."""

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(message, hint)
    self.message = message
    self.hint = hint

  def __str__(self) -> str:
    return self.message if not self.hint else f"{self.message} ({self.hint})"

  def __reduce__(self):
    return type(self), (self.message, self.hint)


class ConfigError(UserError, ValueError):
  """A bad flag, config value or spec string."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """An input file or folder the user named does not exist (or is the wrong kind: a folder for a file)."""


class UserFileExistsError(UserError, FileExistsError):
  """An output the user named already exists and is never overwritten, or a workdir holds another run."""


class InputFormatError(UserError, ValueError):
  """An input file the user gave is malformed (the message names the file)."""


class DeviceMemoryError(UserError, MemoryError):
  """The job's sizes do not fit the accelerator's memory (XLA's RESOURCE_EXHAUSTED at compile or allocation)."""


def format_user_error(error: BaseException) -> str:
  """The lines printed for a user mistake: `error: message` and, when there is one, `  hint: ...`."""
  if isinstance(error, UserError):
    message, hint = error.message, error.hint
  else:
    message, hint = str(error), None
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
      message = f"{error.filename}: {error.strerror}"
  message = message.strip()
  return f"error: {message}" + (f"\n  hint: {hint}" if hint else "")


def closest(name: str, keys: list[str]) -> list[str]:
  """Up to 3 of `keys` close to a misspelt `name`, for a "did you mean ...?": its initials first
  (learning_rate -> lr), then difflib's closest."""
  initials = "".join(w[:1] for w in name.split("_") if w)
  first = [k for k in keys if len(name.split("_")) > 1 and k == initials]
  return (first + [k for k in difflib.get_close_matches(name, keys, n=3, cutoff=0.5) if k not in first])[:3]
