"""Local files that a failure never leaves half-written behind.

`open_new(path)` opens `path` for writing only if nothing is there (mode "x": checked atomically, so nothing a user
wrote is overwritten) and removes it again if the body raises, Ctrl-C included: the file is then this call's own.
Without it a disk that filled up, or a Ctrl-C, left a truncated file (a history, a picture) that the retry refused
as existing. `replace_whole(path, text)` writes a file that may exist (a cache entry, a record of settings) through
a temporary file beside it, renamed over it at the end: a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def replace_whole(path: str | os.PathLike, text: str, *, tmp_prefix: str | None = None) -> None:
  """Writes `text` (UTF-8) to `path` whole or not at all, through a temporary file in its folder named
  `<tmp_prefix>*.tmp` (default `.<name>.`), renamed over `path`; the temporary file is removed if the write fails."""
  folder, name = os.path.split(os.fspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=tmp_prefix or f".{name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
