"""Process faults of a real trainer (issue 17): grain workers die with a SIGKILLed trainer; SIGTERM stops at the
next step, with one process and with two jax.distributed processes that agree on the step."""
import json
import os
import signal
import sys

import pytest

from tests import background, together
from tests.training.helpers import processes_of_two, subprocess_env


def _sigkilled(folder):
  """tests/training/sigkill_workers.py as the command of a job registered in tests/background.py (run from the
  session's start on the core the other tests leave idle)."""
  return [background.Command([sys.executable, "-m", "tests.training.sigkill_workers", str(folder / "run"),
                              str(folder / "workers.json")], subprocess_env())]


sigkilled = background.finished_work(__name__, "sigkilled", _sigkilled)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")
def test_grain_workers_die_with_a_sigkilled_trainer(sigkilled):
  folder, (run,) = sigkilled
  assert run.returncode == 0, run.stderr[-3000:]
  seen = json.loads((folder / "workers.json").read_text())
  assert len(seen["workers"]) >= 2, seen
  assert not seen["survivors"], \
      f"grain workers outlived the SIGKILLed trainer: {[seen['workers'][str(p)][:120] for p in seen['survivors']]}"


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
  # The stop flushes the metrics of the step it saves.
  assert together.logged_steps(folder / "run" / "metrics.jsonl") == [saved]
