"""Subprocess work a test module needs that depends on nothing else in the session (a training run, a bench), started
with the session instead of when the module runs.

On CI's 2 cores most tests keep one core busy. A module registers its work here at import (collection); when the
session's first test starts, tests/conftest.py queues the work of every module with a selected test that uses the
named fixture, in the order those tests run. Two jobs run at a time (two niced processes take all the CPU a 2-core
machine leaves idle; more would only split it away from the work needed first), each in a thread, its commands one
after the other in subprocesses at the lowest CPU priority (nice 19): they run on the core the other tests leave idle
and barely take CPU from them. The fixture waits only for what is left (all of it when its module runs alone); from
then on the job runs at the test's priority. Nothing the commands compute depends on their priority. Their output
goes to files, so no pipe fills while nobody reads it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import threading
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNNING = 2  # queued jobs running at once


@dataclasses.dataclass(frozen=True)
class Command:
  argv: Sequence[str]
  env: dict
  cwd: pathlib.Path = REPO


Factory = Callable[[pathlib.Path], Sequence[Command]]
_FACTORIES: dict[tuple[str, str], Factory] = {}
_JOBS: dict[tuple[str, str], "Job"] = {}
_QUEUE: list["Job"] = []
_QUEUE_LOCK = threading.Lock()


class Job:
  """`commands` run one after the other (stopping after one that fails) in a thread, each in a niced subprocess, once
  started; `folder` is where the factory put their files, their output goes to `logs`."""

  def __init__(self, commands: Sequence[Command], folder: pathlib.Path, logs: pathlib.Path):
    self.folder = folder
    self._commands, self._logs = list(commands), logs
    self._results: list[subprocess.CompletedProcess] = []
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    self._stopped = self._awaited = False
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self) -> None:
    with self._lock:
      if self._thread.ident is None and not self._stopped:
        self._thread.start()

  def running(self) -> bool:
    return self._thread.is_alive()

  def _run(self) -> None:
    for i, command in enumerate(self._commands):
      out, err = self._logs / f"{i}.stdout", self._logs / f"{i}.stderr"
      with self._lock, open(out, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as e:
        if self._stopped:
          break
        self._proc = subprocess.Popen(list(command.argv), env=command.env, cwd=command.cwd, stdout=o, stderr=e,
                                      preexec_fn=None if self._awaited else lambda: os.nice(19))
      code = self._proc.wait()
      self._results.append(subprocess.CompletedProcess(command.argv, code, out.read_text(), err.read_text()))
      if code != 0:
        break
    _dispatch(finished=self)

  def result(self, timeout: float = 1200) -> list[subprocess.CompletedProcess]:
    """The finished commands (all of them, or up to the first that failed), once the job is done. A test waits for
    it from now: it starts if it was still queued, and what still runs goes back to the test's priority (on a machine
    others load too, niced work could wait long), as does what is left."""
    with self._lock:
      self._awaited = True
      if self._proc is not None and self._proc.poll() is None:
        _renice(self._proc.pid, os.getpriority(os.PRIO_PROCESS, 0))
    self.start()
    self._thread.join(timeout)
    assert not self._thread.is_alive(), f"{self._commands[len(self._results)].argv} still runs after {timeout} s"
    return self._results

  def stop(self) -> None:
    with self._lock:
      self._stopped = True
      if self._proc is not None and self._proc.poll() is None:
        self._proc.kill()
    if self._thread.ident is not None:
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


def _dispatch(finished: Job | None = None) -> None:
  """Starts queued jobs while fewer than RUNNING run (`finished`: the job whose thread calls this as it ends)."""
  with _QUEUE_LOCK:
    while _QUEUE and sum(j.running() and j is not finished for j in _JOBS.values()) < RUNNING:
      _QUEUE.pop(0).start()


def register(module: str, fixture: str, factory: Factory) -> None:
  """Declares that `fixture` of the test module `module` takes the work `factory(folder)` (commands to run in order;
  `folder` is the job's own, fresh)."""
  _FACTORIES[(module, fixture)] = factory


def start_selected(items, mktemp: Callable[[str], pathlib.Path]) -> None:
  """Queues, in the order of the selected tests (pytest items), the registered work of the fixtures they use, and
  starts the first."""
  for item in items:
    module = getattr(getattr(item, "module", None), "__name__", None)
    for fixture in getattr(item, "fixturenames", ()):
      if (module, fixture) in _FACTORIES and (module, fixture) not in _JOBS:
        with _QUEUE_LOCK:
          _QUEUE.append(job(module, fixture, mktemp, start=False))
  _dispatch()


def job(module: str, fixture: str, mktemp: Callable[[str], pathlib.Path], *, start: bool = True) -> Job:
  """The job of `fixture` of `module` (made now if it was not; `start`: started now if it was not)."""
  if (module, fixture) not in _JOBS:
    folder = mktemp(fixture)
    _JOBS[(module, fixture)] = Job(_FACTORIES[(module, fixture)](folder), folder, mktemp(f"{fixture}_logs"))
  if start:
    _JOBS[(module, fixture)].start()
  return _JOBS[(module, fixture)]


def stop_all() -> None:
  with _QUEUE_LOCK:
    _QUEUE.clear()
  for made in _JOBS.values():
    made.stop()
  _JOBS.clear()
