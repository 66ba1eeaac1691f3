"""One evaluation job per results file: an OS lock on `OUT.json.partial/lock`, held while the job runs.

Two jobs started with the same `config.output` both appended to the ledgers in `OUT.json.partial/` (each example
predicted twice, and the first to finish scored a merge of both and removed the folder the other still wrote to).
Process 0 of a job, the one that writes the ledger folder, now takes an exclusive `flock` on its `lock` file (and
writes its pid and host into it) before it reads or writes anything there; the process 0 of a second job finds the
lock taken, and every process of that job stops with one line naming the output and the other job's pid and host.

The kernel releases the lock when the process ends in any way (SIGKILL and the OOM killer included), so a killed
job never blocks its rerun: the file may stay behind, its lock does not. The file is removed when the job ends.

Storage: on a local disk and on NFS (the Linux client takes `flock` as a whole-file NFS lock: v4, or v3 with lockd;
a host that dies holding one frees it when its NFSv4 lease expires, 90 s by default) the lock keeps apart jobs on
any hosts that see the folder. A FUSE-mounted bucket (gcsfuse) keeps locks on the host that takes them: two jobs on
one machine are kept apart, two on different machines are not. Where the filesystem refuses locks (NFS mounted with
`nolock`: ENOLCK), the job warns and runs without one. The output is never a URL (`results.check_output_free`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pathlib
import socket

from qwenvl_jax import errors

LOCK_FILE = "lock"


class OutputBusyError(errors.UserError):
  """Another job holds the lock of the results file this job was started with."""


class OutputLock:
  """The lock of one ledger folder (`results.partial_dir(OUT)`); `acquire` once, `release` when the job ends."""

  def __init__(self, directory: str | os.PathLike):
    self.path = pathlib.Path(directory) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self, output: str | os.PathLike) -> None:
    """Takes the lock without waiting; creates the folder when missing.

    Raises:
      OutputBusyError: another job holds it (named by its pid and host where its lock file says them).
    """
    while True:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except FileNotFoundError:  # the holder removed the folder as it finished: try again
        continue
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise OutputBusyError(
              f"another evaluation job{self._holder()} is writing the results {os.fspath(output)} (its ledgers in "
              f"{self.path.parent}); two jobs with one output would mix their predictions",
              "wait for it to end (then a rerun resumes or finds the results), or choose another "
              "--config.output") from None
        logging.warning("cannot lock %s (%s): a second job with the same output would not be refused", self.path,
                        os.strerror(e.errno))
        return
      if _same_file(fd, self.path):
        break
      os.close(fd)  # the holder removed this file after we opened it; a new one is free to take
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode("utf-8"))
    self._fd = fd

  def release(self) -> None:
    """Removes the lock file (and the ledger folder, when that leaves it empty) and releases the lock; a no-op
    when it is not held."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if _same_file(fd, self.path):  # a finished run's finalize removed the folder already
        self.path.unlink()
        try:
          self.path.parent.rmdir()
        except OSError:  # it holds ledgers (or another job's new lock file)
          pass
    finally:
      os.close(fd)

  def _holder(self) -> str:
    """' (pid P on HOST)' from the lock file, or '' when it says nothing readable (its holder is just writing it)."""
    try:
      holder = json.loads(self.path.read_text(encoding="utf-8"))
      return f" (pid {int(holder['pid'])} on {holder['host']})"
    except (OSError, ValueError, KeyError, TypeError):
      return ""


def _same_file(fd: int, path: pathlib.Path) -> bool:
  """Whether the open `fd` is still the file at `path`."""
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False
