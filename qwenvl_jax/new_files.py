"""A new local file that a failure never leaves half-written behind.

`open_new(path)` opens `path` for writing only if nothing is there (mode "x": checked atomically, so nothing a user
wrote is overwritten) and removes it again if the body raises, Ctrl-C included: the file is then this call's own.
Without it a disk that filled up, or a Ctrl-C, left a truncated file (a history, a picture) that the retry refused
as existing.
"""

from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator


@contextlib.contextmanager
def open_new(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
  """`open(path, "x"/"xb")`, removed again when the body (or the close) raises; FileExistsError if `path` exists."""
  f = open(path, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"}))  # pylint: disable=R1732
  try:
    with f:
      yield f
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(path)
    raise
