"""Subprocess work a test module needs that depends on nothing else in the session (a training run, a bench), started
with the session instead of when the module runs.

On CI's 2 cores most tests keep one core busy. A module registers its work here at import (collection); when the
session's first test starts, tests/conftest.py queues the work of every module with a selected test that uses the
named fixture, in the order those tests run. One job runs at a time (`RUNNING`; two at a time made the whole suite
slower, 1054 s against 1020 s quiet on 2 cores, its early subprocess tests most), in a thread, its commands one
after the other in subprocesses at the lowest CPU priority (nice 19): they run on what CPU the other tests leave
idle and barely take CPU from them. The fixture waits only for what is left (all of it when its module runs alone); from
then on the job runs at the test's priority. Nothing the commands compute depends on their priority. Their output
goes to files, so no pipe fills while nobody reads it. A job that cannot run (its factory or its thread fails, not
one of its commands) fails the tests that wait for it, with its error; the session's end kills what is left of a
job, processes its commands started included (each command leads a process group of its own).

A module's fixture must carry the name its work is registered under (`start_selected` refuses work registered
under any other name: a test that fetched its job in its body started it only when it ran). A command line whose
exit 2 is what a test checks is a `Command(check=False)`. At the session's end pytest prints each job's span, wall,
CPU and waiting time (`summary`): an idle stretch after the last job is CPU that more work could use. The tests
of the modules that register work run after all the others (`modules_with_work_last`): their jobs are done by then.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import threading
import time
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNNING = 1  # queued jobs running at once (the module docstring says why not 2)


@dataclasses.dataclass(frozen=True)
class Command:
  """`check=False`: the job goes on after this command exits non-zero (a command line whose exit 2 is the test's
  subject); by default a failed command ends the job."""
  argv: Sequence[str]
  env: dict
  cwd: pathlib.Path = REPO
  check: bool = True


Factory = Callable[[pathlib.Path], Sequence[Command]]
_FACTORIES: dict[tuple[str, str], Factory] = {}
_JOBS: dict[tuple[str, str], "Job"] = {}
_QUEUE: list["Job"] = []
_RUNNING: set["Job"] = set()  # started and not yet finished (under _QUEUE_LOCK)
_QUEUE_LOCK = threading.Lock()
REPORT: list[str] = []  # `summary`'s lines, kept at the session's end for pytest's terminal summary


class Job:
  """`commands` run one after the other (stopping after one that fails, unless its `check` is off) in a thread,
  each in a niced subprocess, once started; `folder` is where the factory put their files, their output goes to
  `logs`."""

  def __init__(self, commands: Sequence[Command], folder: pathlib.Path, logs: pathlib.Path,
               error: BaseException | None = None):
    self.folder = folder
    self._commands, self._logs = list(commands), logs
    self._results: list[subprocess.CompletedProcess] = []
    self._error = error  # the factory's or the thread's own failure (not a command's), raised by `result`
    self._lock = threading.Lock()
    self._progress = threading.Condition(self._lock)  # notified as each command finishes and at the end
    self._done = False
    self._proc: subprocess.Popen | None = None
    self._stopped = False
    self._awaited = 0  # commands before this index run at the test's priority (a test waits for them)
    self.timings: list[tuple[float, float, float]] = []  # per finished command: start (time.time()), wall, CPU s
    self.waited = 0.0  # seconds tests spent in `result`
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self) -> None:
    with self._lock:
      if self._thread.ident is None and not self._stopped:
        with _QUEUE_LOCK:
          _RUNNING.add(self)
        self._thread.start()

  def _run(self) -> None:
    try:
      if self._error is not None:
        return
      for i, command in enumerate(self._commands):
        out, err = self._logs / f"{i}.stdout", self._logs / f"{i}.stderr"
        with self._lock, open(out, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as e:
          if self._stopped:
            break
          # `nice` execs the command (same pid: `result` can renice it); a new session, so `stop` kills its children.
          niced = [] if i < self._awaited else ["nice", "-n", "19"]
          self._proc = subprocess.Popen(niced + list(command.argv), env=command.env, cwd=command.cwd, stdout=o,
                                        stderr=e, start_new_session=True)
        start = time.time()
        try:  # wait4: the command's CPU time with that of the children it waited for (a trainer's processes)
          _, status, usage = os.wait4(self._proc.pid, 0)
          code = self._proc.returncode = os.waitstatus_to_exitcode(status)
          cpu = usage.ru_utime + usage.ru_stime
        except ChildProcessError:  # a `poll` of `result` or `stop` reaped it first, and recorded its code
          code, cpu = self._proc.wait(), float("nan")
        self.timings.append((start, time.time() - start, cpu))
        done = subprocess.CompletedProcess(command.argv, code, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))
        with self._lock:
          self._results.append(done)
          self._progress.notify_all()
        if code != 0 and command.check:
          break
    except BaseException as e:  # pylint: disable=broad-except  (reported by `result`, in the test that waits)
      self._error = e
    finally:
      with self._lock:
        self._done = True
        self._progress.notify_all()
      _dispatch(finished=self)

  def result(self, timeout: float = 1200, commands: int | None = None) -> list[subprocess.CompletedProcess]:
    """The finished commands (all of them, or up to the first that failed), once the job is done, or once its first
    `commands` have finished. A test waits for it from now: it starts if it was still queued, and what still runs
    goes back to the test's priority (on a machine others load too, niced work could wait long), as does what is
    left. Past `timeout` the job is stopped, its processes killed, and the test fails."""
    wanted = len(self._commands) if commands is None else commands
    with self._lock:
      self._awaited = max(self._awaited, wanted)
      if self._proc is not None and self._proc.poll() is None and len(self._results) < wanted:
        _renice(self._proc.pid, os.getpriority(os.PRIO_PROCESS, 0))  # the running command is one of them
    self.start()
    began = time.monotonic()
    with self._lock:
      finished = self._progress.wait_for(lambda: self._done or len(self._results) >= wanted, timeout)
      self.waited += time.monotonic() - began
      if self._error is not None:
        raise RuntimeError(f"the background job of {self.folder.name} failed") from self._error
      results = list(self._results)
    if not finished:
      self.stop()
      raise AssertionError(f"{self._commands[len(results)].argv} still ran after {timeout} s (stopped)")
    return results

  def stop(self) -> None:
    with self._lock:
      self._stopped = True
      if self._proc is not None and self._proc.poll() is None:
        try:
          os.killpg(self._proc.pid, signal.SIGKILL)  # the command and what it started (a trainer, a build)
        except ProcessLookupError:
          pass
      if self._thread.ident is None:  # never started: nothing will finish it
        self._done = True
        self._progress.notify_all()
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
    _RUNNING.discard(finished)
    ready = []
    while _QUEUE and len(_RUNNING) + len(ready) < RUNNING:
      ready.append(_QUEUE.pop(0))
  for queued in ready:  # outside the queue's lock: `start` takes it
    queued.start()


def register(module: str, fixture: str, factory: Factory) -> None:
  """Declares that `fixture` of the test module `module` takes the work `factory(folder)` (commands to run in order;
  `folder` is the job's own, fresh)."""
  _FACTORIES[(module, fixture)] = factory


def finished_work(module: str, fixture: str, factory: Factory, *, scope: str = "module"):
  """`register`s `factory` as `fixture` of `module` and returns that fixture, to assign to the module's attribute
  of the same name: it gives (the job's folder, its finished commands)."""
  import pytest  # pylint: disable=import-outside-toplevel
  register(module, fixture, factory)

  @pytest.fixture(scope=scope, name=fixture)
  def finished(tmp_path_factory):
    made = job(module, fixture, tmp_path_factory.mktemp)
    return made.folder, made.result()
  return finished


def modules_with_work_last(items: list) -> list:
  """`items` (pytest's, in collection order) with the tests of every module that registered work moved after all the
  others, each part in its own order (a module's tests stay together, so its module fixtures are made once).

  With one job at a time, a test that comes when its job has not finished waits in the foreground while the other
  core does the job (the twenty-fourth session's suite waited 49 s so: its evaluation tests came at 230 s, after
  280 s of queued jobs). Last, they come after some 800 s of other tests, by which time the jobs are done."""
  with_work = {module for module, _ in _FACTORIES}
  first, last = [], []
  for item in items:
    (last if getattr(getattr(item, "module", None), "__name__", None) in with_work else first).append(item)
  return first + last


def start_selected(items, mktemp: Callable[[str], pathlib.Path]) -> None:
  """Queues, in the order of the selected tests (pytest items), the registered work of the fixtures they use, and
  starts the first.

  Raises:
    RuntimeError: a selected test's module registered work under a name that is none of its fixtures (its tests
      then fetched the job in their body, and it ran only when they did: the nineteenth session's three trainer
      jobs waited so, in the foreground, while the background core was idle).
  """
  modules = {getattr(item, "module", None) for item in items} - {None}
  for (name, fixture) in _FACTORIES:
    for module in modules:
      if module.__name__ == name and not callable(getattr(module, fixture, None)):
        raise RuntimeError(f"{name} registers background work as {fixture!r} but defines no fixture of that name: "
                           "tests/background.py queues a job at the session's start only for a fixture that a "
                           "selected test names")
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
    try:
      commands, error = _FACTORIES[(module, fixture)](folder), None
    except Exception as e:  # pylint: disable=broad-except  (fails the tests that wait for it, not the session)
      commands, error = [], e
    _JOBS[(module, fixture)] = Job(commands, folder, mktemp(f"{fixture}_logs"), error)
  if start:
    _JOBS[(module, fixture)].start()
  return _JOBS[(module, fixture)]


def summary(session_start: float) -> list[str]:
  """One line per job made this session: when its commands ran (seconds from `session_start`, a time.time()), their
  wall and CPU time, and how long tests waited for it. Idle stretches between jobs show a background core that
  more work could use; long waits, a job queued too late or too big."""
  lines = []
  for (module, fixture), made in _JOBS.items():
    if made.timings:
      first, last = made.timings[0], made.timings[-1]
      span = f"{first[0] - session_start:6.0f}-{last[0] + last[1] - session_start:4.0f} s"
    else:
      span = "never ran".rjust(13)
    lines.append(f"{span}  wall {sum(t[1] for t in made.timings):6.1f} s  CPU {sum(t[2] for t in made.timings):6.1f} s"
                 f"  waited {made.waited:5.1f} s  {module.rpartition('.')[2]}::{fixture} "
                 f"({len(made.timings)}/{len(made._commands)} commands)")
  return sorted(lines)


def stop_all() -> None:
  with _QUEUE_LOCK:
    _QUEUE.clear()
  for made in _JOBS.values():
    made.stop()
  _JOBS.clear()
