"""Process faults of a real trainer (issue 17): grain workers die with a SIGKILLed trainer; SIGTERM stops at the
next step, with one process and with two jax.distributed processes that agree on the step."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import background, together
from tests.training.helpers import (REPO, process_alive, processes_of_two, small_flags, subprocess_env,
                                    wait_for_step)


def _children(pid: int) -> dict[int, str]:
  """pid -> command line of the live (not zombie) child processes of `pid`."""
  out = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
      continue
    fields = stat.rsplit(")", 1)[1].split()
    if int(fields[1]) == pid and fields[0] != "Z":
      out[int(entry)] = cmdline
  return out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")
def test_grain_workers_die_with_a_sigkilled_trainer(uninterrupted, tmp_path):
  del uninterrupted  # compiled the same step: the subprocess takes it from the session's compilation cache
  cmd = [sys.executable, "-m", "qwenvl_jax.train"] + small_flags(
      2, tmp_path, **{"data.num_workers": 2, "total_steps": 1000})
  proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  workers = {}
  try:
    deadline = time.time() + 300
    while time.time() < deadline and len(workers) < 2:
      assert proc.poll() is None, f"trainer exited with {proc.returncode}"
      workers = {p: c for p, c in _children(proc.pid).items() if "resource_tracker" not in c}
      time.sleep(0.5)
    assert len(workers) >= 2, "the grain worker processes did not start"
    wait_for_step(tmp_path, 1, proc, timeout=600)  # the workers are past their start-up and delivering batches
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(process_alive(p) for p in workers):
    time.sleep(0.2)
  survivors = [p for p in workers if process_alive(p)]
  for p in survivors:
    os.kill(p, signal.SIGKILL)
  assert not survivors, f"grain workers outlived the SIGKILLed trainer: {[workers[p][:120] for p in survivors]}"


def _logged_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def _sigterm_of_one(folder):
  """Two jax.distributed trainer processes, and SIGTERM to process 1 once process 0 prints its start line (right
  before the first step): one command of tests/together.py, registered in tests/background.py (it starts with the
  session at the lowest CPU priority; process 1 compiles everything, the compilation cache being process 0's)."""
  processes = processes_of_two(folder / "run", total_steps=4, log_every=50, **{"checkpoint.every": 100})
  sigterm = {"to": 1, "signal": int(signal.SIGTERM), "when": {"stderr_of": 0, "contains": "stage 2: model"}}
  return [background.Command(together.write_spec(folder / "processes", processes, signal=sigterm),
                             subprocess_env(devices=2))]


background.register(__name__, "sigterm_of_one", _sigterm_of_one)


@pytest.fixture(scope="module")
def sigterm_of_one(tmp_path_factory):
  """(folder of the run, result of tests/together.py, stderr of each process)."""
  job = background.job(__name__, "sigterm_of_one", tmp_path_factory.mktemp)
  (done,) = job.result()
  assert done.returncode == 0, done.stderr[-3000:]
  return (job.folder, *together.read_result(job.folder / "processes"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_on_one_of_two_processes_stops_both_at_the_next_step(sigterm_of_one):
  """JAX's preemption notifier sees the SIGTERM of process 1 and both processes save the same, next step, before
  the end of the run (step 4; no log/checkpoint boundary before it, where the processes used to agree). The step
  program is the one of test_train.py's two-process run (log and checkpoint cadence are not part of it)."""
  folder, result, errs = sigterm_of_one
  assert result["signalled"], errs[0][-3000:]
  for code, err in zip(result["codes"], errs):
    assert code == 143, err[-3000:]
  ckpts = folder / "run" / "checkpoints"
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert len(steps) == 1 and 1 <= steps[0] <= 3, steps
  saved = steps[0]
  assert f"stop requested: saved step {saved}" in errs[0]
  data_files = sorted(os.listdir(ckpts / str(saved) / "data"))
  assert len([f for f in data_files if "process_" in f]) == 2, data_files
  assert json.loads((ckpts / str(saved) / "meta" / "metadata").read_text())["step"] == saved
  assert _logged_steps(folder / "run") == [saved]  # the stop flushes the metrics of the step it saves
