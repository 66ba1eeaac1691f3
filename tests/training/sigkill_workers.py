"""`python -m tests.training.sigkill_workers WORKDIR OUT`: a trainer with two grain worker processes is SIGKILLed
once it has logged its first step (its workers past their start-up and delivering batches); which of its workers
still ran 10 s later goes to OUT, a JSON file {"workers": {pid: command line}, "survivors": [pid, ...]} (survivors
are then killed). It runs as the command of a background job (tests/background.py); a failure before the kill
(the trainer exiting, no workers) exits non-zero with its traceback, which the test that waits for the job shows.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from tests.training.helpers import REPO, live_children, process_alive, small_flags, subprocess_env, wait_for_step


def main(workdir: pathlib.Path, out: pathlib.Path) -> None:
  cmd = [sys.executable, "-m", "qwenvl_jax.train"] + small_flags(
      2, workdir, **{"data.num_workers": 2, "total_steps": 1000})
  log = out.with_suffix(".trainer.stderr")
  with open(log, "w", encoding="utf-8") as stderr:
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
  workers = {}
  try:
    deadline = time.time() + 600
    while time.time() < deadline and len(workers) < 2:
      if proc.poll() is not None:
        raise AssertionError(f"trainer exited with {proc.returncode}: {log.read_text()[-3000:]}")
      workers = {p: c for p, c in live_children(proc.pid).items() if "resource_tracker" not in c}
      time.sleep(0.5)
    if len(workers) < 2:
      raise AssertionError(f"the grain worker processes did not start: {workers}")
    wait_for_step(workdir, 1, proc, timeout=900)  # the workers are past their start-up and delivering batches
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(process_alive(p) for p in workers):
    time.sleep(0.2)
  survivors = [p for p in workers if process_alive(p)]
  for p in survivors:
    os.kill(p, signal.SIGKILL)
  out.write_text(json.dumps({"workers": workers, "survivors": survivors}))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
