"""Subprocess work a test module needs that depends on nothing else in the session (a training run, a bench), started
with the session instead of when the module runs.

On CI's 2 cores most tests keep one core busy. A module registers its work here at import (collection); when the
session's first test starts, tests/conftest.py starts the work of every module with a selected test that uses the
named fixture, each job in a thread of its own, its commands one after the other in subprocesses at the lowest CPU
priority (nice 19): they run on the core the other tests leave idle and barely take CPU from them, and the fixture
waits only for what is left (all of it when its module runs alone). Nothing the commands compute depends on their
priority. Their output goes to files, so no pipe fills while nobody reads it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import threading
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Command:
  argv: Sequence[str]
  env: dict
  cwd: pathlib.Path = REPO


Factory = Callable[[pathlib.Path], Sequence[Command]]
_FACTORIES: dict[tuple[str, str], Factory] = {}
_JOBS: dict[tuple[str, str], "Job"] = {}


class Job:
  """`commands` run one after the other (stopping after one that fails) in a thread, each in a niced subprocess;
  `folder` is where the factory put their files, their output goes to `logs`."""

  def __init__(self, commands: Sequence[Command], folder: pathlib.Path, logs: pathlib.Path):
    self.folder = folder
    self._commands, self._logs = list(commands), logs
    self._results: list[subprocess.CompletedProcess] = []
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    self._stopped = self._awaited = False
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    for i, command in enumerate(self._commands):
      out, err = self._logs / f"{i}.stdout", self._logs / f"{i}.stderr"
      with self._lock, open(out, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as e:
        if self._stopped:
          return
        self._proc = subprocess.Popen(list(command.argv), env=command.env, cwd=command.cwd, stdout=o, stderr=e,
                                      preexec_fn=None if self._awaited else lambda: os.nice(19))
      code = self._proc.wait()
      self._results.append(subprocess.CompletedProcess(command.argv, code, out.read_text(), err.read_text()))
      if code != 0:
        return

  def result(self, timeout: float = 1200) -> list[subprocess.CompletedProcess]:
    """The finished commands (all of them, or up to the first that failed), once the job is done. A test waits for
    it from now: what still runs goes back to the test's priority (on a machine others load too, niced work could
    wait long), and what is left starts at it."""
    with self._lock:
      self._awaited = True
      if self._proc is not None and self._proc.poll() is None:
        _renice(self._proc.pid, os.getpriority(os.PRIO_PROCESS, 0))
    self._thread.join(timeout)
    assert not self._thread.is_alive(), f"{self._commands[len(self._results)].argv} still runs after {timeout} s"
    return self._results

  def stop(self) -> None:
    with self._lock:
      self._stopped = True
      if self._proc is not None and self._proc.poll() is None:
        self._proc.kill()
    self._thread.join()


def _renice(pid: int, niceness: int) -> None:
  """Gives every thread of process `pid` and of its descendants `niceness`, where allowed (a process needs
  CAP_SYS_NICE to raise a priority back; without it, or once they are gone, they are left as they are)."""
  try:
    for tid in os.listdir(f"/proc/{pid}/task"):
      os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
      with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
        for child in f.read().split():
          _renice(int(child), niceness)
  except OSError:
    pass


def register(module: str, fixture: str, factory: Factory) -> None:
  """Declares that `fixture` of the test module `module` takes the work `factory(folder)` (commands to run in order;
  `folder` is the job's own, fresh)."""
  _FACTORIES[(module, fixture)] = factory


def start_selected(items, mktemp: Callable[[str], pathlib.Path]) -> None:
  """Starts the registered work of the modules whose selected tests (pytest items) use its fixture."""
  for item in items:
    module = getattr(getattr(item, "module", None), "__name__", None)
    for fixture in getattr(item, "fixturenames", ()):
      if (module, fixture) in _FACTORIES:
        job(module, fixture, mktemp)


def job(module: str, fixture: str, mktemp: Callable[[str], pathlib.Path]) -> Job:
  """The started job of `fixture` of `module` (started now if it was not)."""
  if (module, fixture) not in _JOBS:
    folder = mktemp(fixture)
    _JOBS[(module, fixture)] = Job(_FACTORIES[(module, fixture)](folder), folder, mktemp(f"{fixture}_logs"))
  return _JOBS[(module, fixture)]


def stop_all() -> None:
  for started in _JOBS.values():
    started.stop()
  _JOBS.clear()
