"""Local files that a failure never leaves half-written behind.

`open_new(path)` opens `path` for writing only if nothing is there (mode "x": checked atomically, so nothing a user
wrote is overwritten) and removes it again if the body raises, Ctrl-C included: the file is then this call's own.
Without it a disk that filled up, or a Ctrl-C, left a truncated file (a history, a picture) that the retry refused
as existing. `replace_whole(path, text)` writes a file that may exist (a cache entry, a record of settings) through
a temporary file beside it, renamed over it at the end: a reader sees the old file or the new one, never half.
`new_folder(dst)` writes a new output folder (an export) as `DST.partial`, renamed to `dst` when it is complete: a
`dst` that exists is always whole, even after a SIGKILL, which leaves only `DST.partial` (named by the retry).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import IO, Iterator

from qwenvl_jax import errors


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


def partial_folder(dst: str | os.PathLike) -> pathlib.Path:
  """Where `new_folder(dst)` writes until the output is complete: `DST.partial` beside `dst`."""
  dst = pathlib.Path(dst)
  return dst.with_name(dst.name + ".partial")


def refuse_url(dst: str | os.PathLike) -> None:
  """errors.ConfigError if `dst` is a URL (gs://...): the folders here are local, and `pathlib` reads
  `gs://bucket/x` as the local `gs:/bucket/x`, so the output would be written on this machine without a word."""
  if "://" in str(dst):
    raise errors.ConfigError(f"output {dst} is a URL; this output is written as a local folder",
                             hint="write it to a local path, then copy it (e.g. gcloud storage cp -r LOCAL URL)")


def refuse_existing(dst: str | os.PathLike) -> None:
  """FileExistsError (one line for `cli.run`) if the local path `dst` exists: nothing a user wrote is overwritten. A
  `*.partial` one is named as what it is, the output of a write that was killed (or is still running). A URL is not
  looked up here: its writer checks it (Orbax refuses an existing checkpoint), or refuses it (`refuse_url`)."""
  if "://" in str(dst):
    return
  if pathlib.Path(dst).exists() or pathlib.Path(dst).is_symlink():
    if str(dst).endswith(".partial"):
      raise FileExistsError(f"output {dst} exists: the half-written output of an export that was killed, or of one "
                            "still running; remove it if none is running")
    raise FileExistsError(f"output {dst} exists; refusing to overwrite it (choose a new output directory)")


@contextlib.contextmanager
def new_folder(dst: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields the new folder `DST.partial` for the body to fill, and renames it to `dst` when the body returns; if the
  body raises (Ctrl-C included) the folder is removed, as this call's own. A process killed outright (SIGKILL, a
  lost machine) leaves `DST.partial`, never a `dst` that looks complete, and the retry names it (`refuse_existing`).

  Raises:
    errors.ConfigError: `dst` is a URL (`refuse_url`).
    FileExistsError: `dst` or `DST.partial` exists when the call starts.
    errors.UserFileExistsError: something appeared at `dst` while the body wrote; it is kept, and the message names
      the complete output left in `DST.partial`.
  """
  refuse_url(dst)  # before pathlib makes gs://b/x a local gs:/b/x
  dst, tmp = pathlib.Path(dst), partial_folder(dst)
  refuse_existing(dst)
  refuse_existing(tmp)
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _rename_finished(tmp, dst)


def _rename_finished(tmp: pathlib.Path, dst: pathlib.Path) -> None:
  """Renames the finished output `tmp` to `dst`. Something created at `dst` meanwhile is kept: a rename would replace
  an empty folder silently and fail on any other with an OSError traceback, after hours of writing. The complete
  output stays at `tmp` and the error says so."""
  if dst.exists() or dst.is_symlink():
    raise errors.UserFileExistsError(f"output {dst} appeared while the export was written; the complete export is "
                                     f"in {tmp}", hint=f"move {tmp} where you want it")
  try:
    tmp.rename(dst)
  except OSError as e:
    raise errors.UserError(f"could not rename the complete export {tmp} to {dst}: {e.strerror}",
                           hint=f"move {tmp} where you want it") from e
