"""bench/bench_train_step_gpu.py runs as a GPU session will run it (where device time is short): the real trainer
per attention kernel in a subprocess, its measured rates read back, the planner's estimate for the same devices,
and a kernel the backend cannot run reported on its row, with a non-zero exit. On CPU with the tiny preset."""
import sys

import pytest

from tests import background
from tests.training import helpers


def _bench(folder):
  """The bench's run (registered in tests/background.py: it starts with the session at the lowest CPU priority; the
  step times it measures are read back, not judged)."""
  del folder
  return [background.Command(
      [sys.executable, "bench/bench_train_step_gpu.py", "--preset=tiny", "--impls=xla,cudnn", "--batch=2",
       "--seq_len=64", "--res=56", "--steps=3", "--log_every=1", "--chip=h200", "--dtype=float32"],
      helpers.subprocess_env(devices=1))]


background.register(__name__, "bench_run", _bench)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
  (proc,) = background.job(__name__, "bench_run", tmp_path_factory.mktemp).result()
  return proc


@pytest.mark.slow
def test_the_gpu_step_bench_measures_and_plans_on_this_host(bench_run):
  proc = bench_run
  assert proc.returncode == 1, proc.stdout + proc.stderr  # cudnn cannot run on a CPU
  rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip().startswith(("xla ", "cudnn "))}
  xla = rows["xla"].split()
  # measured: seconds per step and tokens/s (2 x 64 tokens per step) from the trainer's own metrics.jsonl
  seconds, tokens_per_s = float(xla[1]), float(xla[2])
  # tokens/s is printed to the unit: a slow step (a loaded machine) makes that rounding the larger error
  assert seconds > 0 and tokens_per_s == pytest.approx(2 * 64 / seconds, rel=0.02, abs=0.51)
  # planned: an estimated step-time range and MFU range, and the compiler's bytes per device
  assert xla[3] == "n/a" and xla[4] == "|" and "-" in xla[5] and xla[6].endswith("%") and float(xla[7]) > 0
  assert "failed" in rows["cudnn"]
  assert "cudnn: the trainer failed: error: config.attention_impl='cudnn'" in proc.stdout
